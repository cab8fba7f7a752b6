"""splice(2) of large WRITE payloads from the socket into the image, through a pipe.

Received the ordinary way, a 1 MiB payload is copied from the socket into Python memory and then from there
into the page cache, in a dozen reads each handled by the event loop. Spliced, the kernel moves the socket's
pages into a pipe and copies them once, into the page cache: no copy through Python and no thread.

Only for plain page-cache writes (writeback/unsafe with the write cache on, no FUA, the plain stack, not a
TLS connection): nothing about durability changes -- such a write is as volatile as an inline ``pwrite``, the
disk stack is told of it (``note_write``) so the next FLUSH syncs it, and every FUA or O_DSYNC write still
goes through the stack. The connection pauses its transport while a payload is spliced, so the bytes of the
stream are consumed in order: head (already received), the rest by splice, then the next request.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from typing import Any

from cachemode.nbd.requests import Request

SPLICE_MIN = 256 * 1024
"""WRITE payloads at least this long (and not yet fully received) are spliced."""
PIPE_SIZE = 1024 * 1024
"""Pipe capacity asked for (the default /proc/sys/fs/pipe-max-size); a payload must fit in it."""

Done = Callable[[Request, "OSError | None", bool], None]
"""``done(request, error, fatal)``: error None when the payload is in the image; fatal when the stream
itself failed (the connection must end, nothing was written); else the payload was consumed and ``error`` is
the write's failure to reply with."""


def splice_available() -> bool:
    """Whether this Python and kernel offer splice(2) (Linux, Python >= 3.10); ``CACHEMODE_NBD_SPLICE=0``
    turns it off, for comparisons."""
    return hasattr(os, "splice") and os.environ.get("CACHEMODE_NBD_SPLICE", "1") != "0"


class PayloadSplicer:
    """Moves the rest of one WRITE payload at a time from a socket into the image, for one connection.

    The whole payload is gathered before any of it is written, so a client that vanishes in the middle of a
    WRITE leaves the image untouched, as on the ordinary path. The pipe's capacity counts the kernel's page
    fragments, not bytes: should it fill before the payload is complete, what it holds is read out into
    memory (one copy, as an ordinary receive would make) and splicing goes on. The socket's own fd belongs
    to the transport, whose reading is paused meanwhile; readiness is watched on a duplicate of it (an event
    loop refuses a second watcher on a transport's fd).
    """

    def __init__(self, loop: Any, sock_fd: int, image_fd: int) -> None:
        self.loop = loop
        self._sock_fd = sock_fd
        self._image_fd = image_fd
        self._watch_fd = -1
        self._watching = False
        self._req: Request | None = None
        self._head: bytes | memoryview = b""
        self._done: Done | None = None
        self._spilled: list[bytes] = []
        self._in_pipe = 0
        self._remaining = 0
        self._error: OSError | None = None
        self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC)
        self.capacity = 0
        try:
            self.capacity = fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe allowance: this connection receives the ordinary way
            self.close()

    def fits(self, req: Request, head: bytes | memoryview) -> bool:
        """Whether the rest of this payload fits in the pipe."""
        return self._pipe_w >= 0 and req.length - len(head) <= self.capacity

    def start(self, req: Request, head: bytes | memoryview, done: Done, error: OSError | None = None) -> None:
        """Splice the payload bytes after ``head`` into the pipe, then write head and pipe to the image;
        ``done`` is called once the payload is consumed (maybe before this returns). With ``error`` the
        payload is only consumed. The caller checked :meth:`fits`."""
        self._req = req
        self._head = head
        self._done = done
        self._error = error
        self._in_pipe = 0
        self._remaining = req.length - len(head)
        self._pump()

    def _pump(self) -> None:
        """Splice whatever the socket has, until the payload is complete or the socket runs dry."""
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self._remaining:
            try:
                n = os.splice(self._sock_fd, self._pipe_w, self._remaining, flags=flags)
            except BlockingIOError:
                if not self._socket_has_data():
                    self._watch()
                    return
                if not self._spill():  # the pipe is full, not the socket empty
                    return
                continue
            except OSError as exc:
                self._finish(exc, fatal=True)
                return
            if n == 0:
                self._finish(ConnectionResetError("end of stream inside a WRITE payload"), fatal=True)
                return
            self._remaining -= n
            self._in_pipe += n
        self._unwatch()
        self._write()

    def _socket_has_data(self) -> bool:
        try:
            return struct.unpack("i", fcntl.ioctl(self._sock_fd, termios.FIONREAD, b"\0" * 4))[0] > 0
        except OSError:
            return False

    def _write(self) -> None:
        """Write the bytes taken out of the pipe (head first), then move the pipe's into the image behind
        them -- or discard them all after an error."""
        req = self._req
        assert req is not None
        pos = req.offset
        if self._error is None:
            data = b"".join([self._head, *self._spilled]) if self._spilled else self._head
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(self._image_fd, view[done:], pos + done)
            except OSError as exc:
                self._error = exc
        pos += len(self._head) + sum(len(chunk) for chunk in self._spilled)
        n = self._in_pipe
        try:
            while n:
                if self._error is None:
                    try:
                        moved = os.splice(self._pipe_r, self._image_fd, n, offset_dst=pos)
                    except OSError as exc:
                        self._error = exc
                        continue
                else:
                    moved = len(os.read(self._pipe_r, n))
                n -= moved
                pos += moved
        except OSError as exc:  # the pipe itself failed: nothing sensible is left to do
            self._finish(exc, fatal=True)
            return
        self._finish(self._error, fatal=False)

    def _spill(self) -> bool:
        """Read the full pipe out into memory so splicing can go on; False if the pipe failed."""
        try:
            n = self._in_pipe
            while n:
                chunk = os.read(self._pipe_r, n)
                self._spilled.append(chunk)
                n -= len(chunk)
        except OSError as exc:
            self._finish(exc, fatal=True)
            return False
        self._in_pipe = 0
        return True

    def _watch(self) -> None:
        if self._watching:
            return
        if self._watch_fd < 0:
            self._watch_fd = os.dup(self._sock_fd)
        self.loop.add_reader(self._watch_fd, self._pump)
        self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self._watch_fd)

    def _clear(self) -> None:
        self._req = self._done = None
        self._head = b""
        self._spilled = []
        self._error = None
        self._in_pipe = 0

    def _finish(self, error: OSError | None, *, fatal: bool) -> None:
        self._unwatch()
        req, done = self._req, self._done
        self._clear()
        if req is not None and done is not None:
            done(req, error, fatal)

    def close(self) -> None:
        """Stop watching and release the pipe (the connection is gone; a payload in progress is dropped)."""
        self._unwatch()
        self._clear()
        for fd in (self._pipe_r, self._pipe_w, self._watch_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pipe_r = self._pipe_w = self._watch_fd = -1
