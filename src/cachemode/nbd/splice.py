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
from collections.abc import Callable
from typing import Any

from cachemode.nbd._batch import drain_pipes, fill_pipes
from cachemode.nbd.requests import Request

SPLICE_MIN = 256 * 1024
"""WRITE payloads at least this long (and not yet fully received) are spliced."""
SPLICE_MAX = 1024 * 1024
"""WRITE payloads at most this long are spliced (longer ones are received into a buffer)."""
PIPE_SIZE = SPLICE_MAX
"""Capacity asked for each of a connection's two pipes (the default ``/proc/sys/fs/pipe-max-size``, which binds
all but privileged users). A pipe counts the socket's page fragments, not bytes: a 1 MiB payload often needs
more than one pipe's 256 slots, and without a second pipe it would be read out into memory (a second copy)."""

PIPES_DRY, PIPES_FULL, PIPES_ENDED = 1, 2, 3
"""Why ``_batch.fill_pipes`` stopped short: the socket holds nothing more, both pipes are full, end of stream."""

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
    WRITE leaves the image untouched, as on the ordinary path. It goes into the first pipe, then, once that
    one's slots (which count the kernel's page fragments, not bytes) are full, into the second; should both
    fill before the payload is complete, what they hold is read out into memory (one copy, as an ordinary
    receive would make) and splicing goes on. The socket's own fd belongs to the transport, whose reading is
    paused meanwhile; readiness is watched on a duplicate of it (an event loop refuses a second watcher on a
    transport's fd).
    """

    def __init__(self, loop: Any, sock_fd: int, image_fd: int, mapping: Any = None) -> None:
        self.loop = loop
        self._sock_fd = sock_fd
        self._image_fd = image_fd
        self._mapping = mapping  # the image's shared mapping (server.write_map), or None: see _write
        self.last_mapped = False  # the last payload written went from the pipes into the mapping
        self._watch_fd = -1
        self._watching: Callable[[], None] | None = None  # the callback watching the socket, if any
        self._req: Request | None = None
        self._head: bytes | memoryview = b""
        self._done: Done | None = None
        self._spilled: list[bytes] = []
        self._pipes: list[tuple[int, int]] = []
        self._in = [0, 0]  # payload bytes in each pipe
        self._remaining = 0  # payload bytes still in the socket
        self._error: OSError | None = None
        self.capacity = 0
        for _ in range(2):
            pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
            try:
                size = fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over the user's pipe allowance
                os.close(pipe_r)
                os.close(pipe_w)
                break
            self._pipes.append((pipe_r, pipe_w))
            self.capacity = self.capacity or size
        if not self._pipes:  # this connection receives the ordinary way
            self.close()

    def fits(self, req: Request, head: bytes | memoryview) -> bool:
        """Whether the rest of this payload fits in the first pipe (the second is for its slots)."""
        return bool(self._pipes) and req.length - len(head) <= self.capacity

    @property
    def pipes(self) -> tuple[int, int, int, int]:
        """The two pipes' read and write ends, -1 for one that is missing."""
        first, second = [*self._pipes, (-1, -1), (-1, -1)][:2]
        return (*first, *second)

    def start(self, req: Request, head: bytes | memoryview, done: Done, error: OSError | None = None) -> None:
        """Splice the payload bytes after ``head`` into the pipes, then write head and pipes to the image;
        ``done`` is called once the payload is consumed (maybe before this returns). With ``error`` the
        payload is only consumed. The caller checked :meth:`fits`."""
        self._begin(req, head, done, error, 0, 0)

    def resume(self, req: Request, in_first: int, in_second: int, done: Done) -> None:
        """Go on with a payload whose first bytes are in the pipes already (``_batch.splice_writes`` took its
        header and spliced what had arrived): as :meth:`start` from there."""
        self._begin(req, b"", done, None, in_first, in_second)

    def _begin(
        self, req: Request, head: bytes | memoryview, done: Done, error: OSError | None, first: int, second: int
    ) -> None:
        self._req = req
        self._head = head
        self._done = done
        self._error = error
        self._in = [first, second]
        self._remaining = req.length - len(head) - first - second
        self._pump()

    def _pump(self) -> None:
        """Splice whatever the socket has, until the payload is complete or the socket runs dry (one C call,
        ``_batch.fill_pipes``, per wake: the first pipe until its slots are full, then the second)."""
        _, pipe_w, _, pipe2_w = self.pipes
        while self._remaining:
            first, second = self._in
            want = first + second + self._remaining
            try:
                first, second, state = fill_pipes(self._sock_fd, pipe_w, pipe2_w, want, first, second)
            except OSError as exc:
                self._finish(exc, fatal=True)
                return
            self._in = [first, second]
            self._remaining = want - first - second
            if state == PIPES_DRY:
                self.watch(self._pump)
                return
            if state == PIPES_ENDED:
                self._finish(ConnectionResetError("end of stream inside a WRITE payload"), fatal=True)
                return
            if state == PIPES_FULL and not self._spill():
                return
        self.unwatch(self._pump)
        self._write()

    def _write(self) -> None:
        """Write the bytes taken out of the pipes (head first), then move the pipes' into the image behind
        them, first pipe first (``_batch.drain_pipes``) -- or discard them all after an error. Where every
        page the pipes' bytes land on is dirty in the page cache, they are read into the image's mapping
        instead, past the filesystem's write path (``last_mapped``): the payload is whole by now, so this too
        writes nothing before it is."""
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
        pipe_r, _, pipe2_r, _ = self.pipes
        try:
            err, self.last_mapped = drain_pipes(
                pipe_r, pipe2_r, *self._in, self._image_fd, pos, self._error is not None, self._mapping
            )
        except OSError as exc:  # a pipe itself failed: nothing sensible is left to do
            self._finish(exc, fatal=True)
            return
        if err:
            self._error = OSError(err, os.strerror(err))
        self._finish(self._error, fatal=False)

    def _spill(self) -> bool:
        """Read the full pipes out into memory so splicing can go on; False if a pipe failed."""
        try:
            for (pipe_r, _), n in zip(self._pipes, self._in, strict=False):
                while n:
                    chunk = os.read(pipe_r, n)
                    self._spilled.append(chunk)
                    n -= len(chunk)
        except OSError as exc:
            self._finish(exc, fatal=True)
            return False
        self._in = [0, 0]
        return True

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the socket is readable: this splicer's own pump while a payload trickles in,
        or the connection's while it waits between payloads (see ``NBDConnection._await_payload``)."""
        if self._watching == callback:
            return
        if self._watch_fd < 0:
            self._watch_fd = os.dup(self._sock_fd)
        self.loop.add_reader(self._watch_fd, callback)  # replaces any other watcher of it
        self._watching = callback

    def unwatch(self, callback: Callable[[], None] | None = None) -> None:
        """Stop watching the socket (only if ``callback``, when given, is the one watching)."""
        if self._watching is not None and (callback is None or self._watching == callback):
            self._watching = None
            self.loop.remove_reader(self._watch_fd)

    def _clear(self) -> None:
        self._req = self._done = None
        self._head = b""
        self._spilled = []
        self._error = None
        self._in = [0, 0]

    def _finish(self, error: OSError | None, *, fatal: bool) -> None:
        self.unwatch(self._pump)
        req, done = self._req, self._done
        self._clear()
        if req is not None and done is not None:
            done(req, error, fatal)

    def close(self) -> None:
        """Stop watching and release the pipes (the connection is gone; a payload in progress is dropped)."""
        self.unwatch()
        self._clear()
        for fd in (*(end for pipe in self._pipes for end in pipe), self._watch_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pipes = []
        self._watch_fd = -1
