"""The paths that bypass the transport's buffer or the thread pool: sendfile(2) for buffered READs, splice(2) of
large page-cache WRITE payloads from the socket, Linux native AIO for O_DIRECT, and writev(2) of a large reply
straight from its buffer.

They are a mixin of :class:`cachemode.nbd.connection.NBDConnection`, kept apart because each one writes to the
socket, or to the device, behind asyncio's back and has rules of its own: a reply may go to the socket directly
only while the transport has nothing buffered (so bytes stay in order), and native AIO is used only for writes
that need no durability of their own (the disk stack decides everything else).
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd.budget import cost
from cachemode.nbd.requests import PayloadFollows, Request
from cachemode.nbd.splice import PayloadSplicer

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("cachemode.nbd")

AIO_CHUNK = 256 * 1024
"""Native-AIO requests larger than this are split into chunks submitted together."""
LARGE_REPLY = 64 * 1024
"""Reads at least this long are sent as header + data without joining them."""


class DirectPaths:
    """sendfile, native AIO and direct writev for :class:`~cachemode.nbd.connection.NBDConnection`."""

    server: Any
    disk: Any
    transport: asyncio.Transport | None
    structured: bool
    closed: bool
    peer: str
    _sock_fd: int
    _out: list[Any]
    _splicer: PayloadSplicer | None
    _splicing: Request | None
    _batch_cost: int
    _read_on: bool
    _draining: bool
    _splice_running: bool
    loop: Any
    tx: Any

    def _splice_write(self, ev: PayloadFollows) -> None:
        """Take a large plain WRITE's payload straight from the socket into the image (splice.py); reading
        from the transport stays paused until the payload is consumed. Only offered by the parser where the
        server allows it and the connection's socket is its own (no TLS). The request was admitted at dispatch,
        charged like any WRITE."""
        req = ev.request
        if self._splicer is None and self._sock_fd >= 0:
            try:
                self._splicer = PayloadSplicer(self.loop, self._sock_fd, self.server.splice_fd, self.server.write_map)
            except OSError as exc:  # no pipe to be had (fd limit): receive the ordinary way
                log.info("%s: no splice: %s", self.peer, exc)
        if self._splicer is None or self._sock_fd < 0 or not self._splicer.fits(req, ev.head):
            # Received into a buffer after all: the charge admitted for the request now pays for that buffer,
            # as if the parser had allocated it (the Request it yields comes with ``buffer`` set: prepaid).
            self._batch_cost -= cost(c.CMD_WRITE, req.length)
            self.tx.collect(ev, self.server.allocate_payload(req.length))
            return
        error = None
        if self.server.shutting_down:
            error = OSError(errno.ESHUTDOWN, "server shutting down")
        self._splicing = req
        self._start(req)
        self._splicer.start(req, ev.head, self._splice_done, error)
        if self._splicing is not None:  # waiting for the socket: the transport must not read meanwhile
            self._update_reading()
        elif error is None:  # the whole payload was there already
            self._read_on = True

    def _splice_done(self, req: Request, error: OSError | None, fatal: bool) -> None:
        self._splicing = None
        if fatal:
            log.info("%s: closing: WRITE payload: %s", self.peer, error)
            self._finish(req)
            self._abort()
            return
        if error is None:
            self.server.note_write()
            self.server.stats.mapped_writes += self._splicer.last_mapped
            reply = replies.simple(req.cookie)
        else:
            self.server.stats.errors += 1
            reply = replies.simple(req.cookie, replies.error_of(error, c.CMD_WRITE))
        self._completed(req, reply)
        if not self._draining and not self._splice_running:
            # The payload trickled in and this is the event loop's callback: splice on from here.
            self._read_ahead()

    def _sendfile(self, req: Request, image_fd: int) -> bool:
        """Send a READ reply straight from the image with sendfile(2), bypassing the transport's buffer.

        Only allowed while the transport has nothing buffered (so bytes stay in order); whatever the socket
        does not take at once is read and handed to the transport. Returns False when it did not apply.
        """
        transport = self.transport
        if transport is None or transport.get_write_buffer_size():
            return False
        hdr = replies.read_header(self.structured, req.cookie, req.offset, req.length)
        fd = self._sock_fd
        try:
            sent = os.write(fd, hdr)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < len(hdr):
            transport.write(hdr[sent:])
            done = 0
        else:
            done = 0
            try:
                while done < req.length:
                    n = os.sendfile(fd, image_fd, req.offset + done, req.length - done)
                    if n == 0:
                        break
                    done += n
            except BlockingIOError:
                pass
            except OSError as exc:
                # The header went out: a failure now cannot be reported, so the connection must end.
                log.info("%s: sendfile failed: %s", self.peer, exc)
                self._abort()
                return True
        if done < req.length:
            try:
                rest = os.pread(image_fd, req.length - done, req.offset + done)
            except OSError as exc:
                log.info("%s: read failed after the reply header: %s", self.peer, exc)
                self._abort()
                return True
            if len(rest) < req.length - done:
                rest += bytes(req.length - done - len(rest))
            transport.write(rest)
        return True

    def _uring_read(self, req: Request, uring: Any, buf: bytearray, skip: int) -> bool:
        """Read a page-cache miss with io_uring into ``buf[skip:]`` (``skip`` bytes kept for a small reply's
        header); False when the ring is full (the caller uses the pool)."""
        fd = self.server.fast_read_fd

        def done(res: int) -> None:
            self._uring_done(req, buf, skip, res)

        if not uring.read(fd, buf, skip, req.length, req.offset, done):
            return False
        self._start(req)
        return True

    def _uring_done(self, req: Request, buf: bytearray, skip: int, res: int) -> None:
        length = req.length
        structured = self.structured
        if res < 0:
            error = replies.error(structured, req.cookie, c.CMD_READ, c.wire_errno(-res), os.strerror(-res))
            self._completed(req, error)
            return
        if res < length:  # short: read the rest here (only at the end of a file that shrank, in practice)
            try:
                rest = os.pread(self.server.fast_read_fd, length - res, req.offset + res)
            except OSError as exc:
                code = replies.error_of(exc, c.CMD_READ)
                self._completed(req, replies.error(structured, req.cookie, c.CMD_READ, code, str(exc)))
                return
            buf[skip + res : skip + res + len(rest)] = rest
            if res + len(rest) < length:
                buf[skip + res + len(rest) : skip + length] = bytes(length - res - len(rest))
        if skip:
            replies.read_header_into(buf, structured, req.cookie, req.offset, length)
            self._completed(req, buf)
        else:
            self._completed(req, (replies.read_header(structured, req.cookie, req.offset, length), buf))

    def _aio(self, req: Request, aio: Any, fd: int) -> bool:
        """Start an aligned READ, or a WRITE that needs no durability of its own or whose durability the
        image's O_DSYNC provides, with native AIO.

        Returns False (nothing started) for anything else, or when the AIO context is full.
        """
        from cachemode.nbd.aio import IOCB_CMD_PREAD, IOCB_CMD_PWRITE

        length = req.length
        if req.command == c.CMD_WRITE:
            disk = self.disk
            # FUA or the guest cache off: the stack decides how the write is made durable. On an image the
            # stack opened O_DSYNC (directsync) the fd itself makes every write, FUA or not, durable before
            # it completes -- an AIO write as much as the stack's own pwrite -- so AIO may take those.
            if not disk.image.dsync and (req.flags & c.CMD_FLAG_FUA or disk.mode.every_write_durable(disk.write_cache)):
                return False
            if isinstance(req.buffer, mmap.mmap):
                buf = req.buffer  # the payload was received straight into aligned memory
            else:
                buf = aio.buffer(length)
                buf[:length] = req.data
            opcode = IOCB_CMD_PWRITE
        else:
            buf = aio.buffer(length)
            opcode = IOCB_CMD_PREAD

        parts = -(-length // AIO_CHUNK)
        if aio.in_flight + parts > aio.depth:
            if buf is not req.buffer:  # the payload's own buffer stays with the request for the fallback
                aio.release(buf)
            return False
        if parts == 1:

            def done(res: int, buf: Any) -> None:
                self._aio_done(req, res, buf, aio)

            if not aio.submit(opcode, fd, buf, length, req.offset, done):
                if buf is not req.buffer:
                    aio.release(buf)
                return False
            self._start(req)
            return True
        # A large request goes to the device as several chunks in parallel (more depth for the device).
        state = [parts, 0]  # parts outstanding, first error (negative errno)

        def part_done(res: int, buf: Any, start: int, size: int) -> None:
            if res < 0:
                state[1] = state[1] or res
            elif res < size:
                if opcode == IOCB_CMD_PREAD:  # past the end of a shrunken image: reads as zeros
                    buf[start + res : start + size] = bytes(size - res)
                else:
                    state[1] = state[1] or -errno.EIO
            state[0] -= 1
            if state[0] == 0:
                self._aio_done(req, state[1] or length, buf, aio)

        self._start(req)
        for i in range(parts):
            start = i * AIO_CHUNK
            size = min(AIO_CHUNK, length - start)
            callback = functools.partial(_part_callback, part_done, start, size)
            if not aio.submit(opcode, fd, buf, size, req.offset + start, callback, buf_offset=start):
                callback(-errno.EAGAIN, buf)  # the context refused mid-way: fail this part
        return True

    def _aio_done(self, req: Request, res: int, buf: Any, aio: Any) -> None:
        length = req.length
        cookie = req.cookie
        if res == -errno.EAGAIN:  # the kernel refused the batch it was in (never ran): the pool does it
            if buf is not req.buffer:
                aio.release(buf)
            self._finish(req)
            self._submit(req)
            return
        if req.command == c.CMD_READ:
            if res < 0:
                result: Any = replies.error(self.structured, cookie, c.CMD_READ, c.wire_errno(-res), os.strerror(-res))
            else:
                hdr = replies.read_header(self.structured, cookie, req.offset, length)
                if res < length:  # only past the end of an image that shrank underneath us
                    buf[res:length] = bytes(length - res)
                if length >= LARGE_REPLY and not self._out and not self.closed:
                    # Large read: straight from the aligned buffer to the socket, copying only what the
                    # socket does not take at once.
                    self._finish(req)
                    if not self._send_direct(hdr, buf, length):
                        aio.release(buf)
                    self._after_completion()
                    return
                result = (hdr, buf[:length])
            aio.release(buf)
            self._completed(req, result)
            return
        if res == length or res < 0:
            if buf is req.buffer:
                self._recycle(req)
            else:
                aio.release(buf)
        if res == length:
            self.server.note_write()
            self._completed(req, replies.simple(cookie))
        elif res < 0:
            self._completed(
                req, replies.simple(cookie, replies.error_of(OSError(-res, os.strerror(-res)), c.CMD_WRITE))
            )
        else:  # a short write: let the stack finish the rest
            self.server.note_write()
            self._finish(req)
            rest = Request(c.CMD_WRITE, 0, cookie, req.offset + res, length - res, memoryview(req.data)[res:])
            self._submit(rest)

    def _send_direct(self, hdr: bytes, buf: Any, length: int) -> bool:
        """Write ``hdr`` + ``buf[:length]`` with writev when nothing is queued before it; queue the rest.

        Returns True when the transport was handed a view of ``buf`` itself (not a copy): the buffer is then
        the transport's, freed (unmapped) once sent, and must not go back to the pool.
        """
        transport = self.transport
        if transport is None:
            return False
        sent = 0
        if self._sock_fd >= 0 and not transport.get_write_buffer_size():
            with memoryview(buf) as view:
                try:
                    sent = os.writev(self._sock_fd, [hdr, view[:length]])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._abort()
                    return False
        total = len(hdr) + length
        if sent >= total:
            return False
        # No copy of the rest: a client that reads slowly must not turn each queued reply into a heap block.
        view = memoryview(buf)[max(0, sent - len(hdr)) : length]
        if sent < len(hdr):
            transport.writelines([hdr[sent:], view])
        else:
            transport.write(view)
        return True


def pwrite_all(fd: int, data: Any, offset: int, done: int = 0) -> None:
    """Write all of ``data`` at ``offset``, of which the first ``done`` bytes are written already (a plain
    page-cache write straight to the image's fd, what the plain stack would do, minus its layers; the caller
    tells the mode layer)."""
    if not done:
        done = os.pwrite(fd, data, offset)
    if done < len(data):
        with memoryview(data) as view:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)


def nowait_works(fd: int | None) -> bool:
    """Whether buffered reads on ``fd`` accept RWF_NOWAIT (Linux >= 5.9 on most filesystems)."""
    if fd is None or not hasattr(os, "RWF_NOWAIT"):
        return False
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True


def _part_callback(done: Callable[[int, Any, int, int], None], start: int, size: int, res: int, buf: Any) -> None:
    done(res, buf, start, size)
