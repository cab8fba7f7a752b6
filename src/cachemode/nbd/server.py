"""The asyncio transport around the sans-IO core: sockets in, disk calls, reply bytes out.

Everything the protocol decides (handshake, parsing, validation, reply layout) lives in the core; this module
only moves bytes and runs disk calls. The hot path is kept lean on purpose:

* page-cache modes (``disk.blocking`` false): a plain READ is one ``preadv(RWF_NOWAIT)`` on the image's fd
  (``disk.fast_read_fd``) run inline in the event loop -- a page-cache hit costs no thread hand-off, a miss
  goes to the pool -- and
  reads of 128 KiB or more go from the image to the socket with ``sendfile(2)``; a plain WRITE below 256 KiB
  is one ``disk.pwrite`` inline, a larger one goes to the pool so the kernel's copy overlaps the next receive;
* O_DIRECT with the plain stack: aligned READs and plain WRITEs use Linux native AIO completed through an
  eventfd in the loop (:mod:`cachemode.nbd.aio`), no thread at all;
* everything else that may wait on the device -- FLUSH, FUA, O_DSYNC I/O, unaligned O_DIRECT requests,
  TRIM, WRITE_ZEROES, block status -- runs through the disk stack on a small thread pool shared by all
  connections, so many requests are in flight at once and replies go out in completion order;
* replies produced in one loop iteration are sent with one vectored write.

FLUSH covers every write already replied to: inline writes have completed before the FLUSH is even parsed,
pooled and AIO writes are replied to only after they completed (AIO ones are reported to the stack's write
counter first), and ``disk.flush()`` syncs the one image every connection shares -- which is why
CAN_MULTI_CONN is advertised. The server never decides about fsync itself: FUA and FLUSH go to the disk stack,
which applies the cache mode; native AIO is used only for writes that need no durability of their own.

Memory per connection is bounded: the parser holds at most one request plus one WRITE payload (32 MiB), and
reading pauses while more than :data:`MAX_IN_FLIGHT` requests or :data:`MAX_IN_FLIGHT_BYTES` of payload are
outstanding, or while more than :data:`WRITE_HIGH_WATER` of replies wait for a client that does not read;
requests already parsed when that happens wait in a backlog, unexecuted, until the congestion clears.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import mmap
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd.aio import BufferPool, open_aio
from cachemode.nbd.export import ExportInfo
from cachemode.nbd.handshake import Aborted, Handshake, ProtocolError, Ready
from cachemode.nbd.requests import Rejected, Request, Transmission

log = logging.getLogger("cachemode.nbd")

HANDSHAKE_LIMIT = 10.0
"""Seconds a client may take to finish negotiating before it is dropped (qemu-nbd's --handshake-limit)."""
MAX_IN_FLIGHT = 64
"""Requests outstanding per connection before the server stops reading from it."""
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
"""READ/WRITE payload bytes outstanding per connection before the server stops reading from it."""
WRITE_HIGH_WATER = 8 * 1024 * 1024
"""Unsent reply bytes per connection before the server stops reading from it."""
INLINE_WRITE_MAX = 256 * 1024
"""Page-cache writes below this size run inline; larger ones go to the pool, so the kernel's copy of one
payload overlaps with receiving the next."""
AIO_CHUNK = 256 * 1024
"""Native-AIO requests larger than this are split into chunks submitted together."""
SEND_EARLY = 1024 * 1024
"""Inline read data queued in one batch before it is handed to the transport (so back-pressure is seen)."""
SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_SNDBUF asked for each connection (the kernel doubles it)."""
LARGE_REPLY = 64 * 1024
"""Reads at least this long are sent as header + data without joining them."""
SENDFILE_MIN = 128 * 1024
"""Buffered reads at least this long go from the image to the socket with sendfile(2), no copy in Python."""


def _error_of(exc: BaseException, command: int) -> int:
    host = getattr(exc, "errno", None)
    error = c.wire_errno(host)
    if error == c.EINVAL and command in (c.CMD_WRITE, c.CMD_WRITE_ZEROES):
        error = c.ENOSPC
    return error


class Stats:
    """Counters a test, the demo or the lab can read."""

    __slots__ = ("connections", "errors", "flushes", "requests")

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.flushes = 0
        self.errors = 0


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection: handshake, then transmission."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.disk = server.disk
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.handshake: Handshake | None = Handshake(server.export)
        self.tx: Transmission | None = None
        self.structured = False
        self.in_flight = 0
        self.in_flight_bytes = 0  # READ/WRITE payload bytes of the requests in flight
        self._backlog: collections.deque[Any] = collections.deque()  # parsed, held back while congested
        self._draining = False
        self._out_size = 0  # bytes of read data in _out not yet handed to the transport
        self.closing = False  # DISC, end of input or shutdown: close once nothing is left to answer
        self.closed = False
        self._paused_reading = False
        self._paused_writing = False
        self._out: list[bytes | memoryview] = []
        self._flush_scheduled = False
        self._done = asyncio.Event()
        self.peer = ""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._sock_fd = -1
        self._hs_buf = memoryview(bytearray(65536))

    # -- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            with contextlib.suppress(OSError):
                # Room for a few large read replies in the kernel, so sendfile completes in one call.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if sock is not None:
            self._sock = sock
            self._sock_fd = sock.fileno()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.server._connections.add(self)
        self.server.stats.connections += 1
        if self.server.shutting_down:
            self._close()
            return
        assert self.handshake is not None
        transport.write(self.handshake.data_to_send())
        if self.server.handshake_limit:
            # The core has no clock: the transport bounds how long a client may take to negotiate.
            self._handshake_timer = self.loop.call_later(self.server.handshake_limit, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if self.tx is None and not self.closed:
            log.info("%s: closing: handshake not finished within %s s", self.peer, self.server.handshake_limit)
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.closed = True
        self.closing = True
        self._out.clear()
        self.server._connections.discard(self)
        self._done.set()

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()
        if self._backlog:
            self._drain_backlog()

    def get_buffer(self, sizehint: int) -> memoryview:
        # In transmission the parser hands out its own buffer: a WRITE payload is received in place.
        if self.tx is not None and not self.tx.closed:
            return self.tx.get_buffer()
        return self._hs_buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            if self.tx is None:
                self._handshake_data(bytes(self._hs_buf[:nbytes]))
            elif not self.tx.closed:
                self._dispatch(self.tx.buffer_updated(nbytes))
        except ProtocolError as err:
            log.info("%s: closing: %s", self.peer, err)
            self._abort()

    def data_received(self, data: bytes) -> None:  # a transport without buffered reads
        if self.closed:
            return
        try:
            if self.tx is None:
                self._handshake_data(data)
            else:
                self._transmission_data(data)
        except ProtocolError as err:
            log.info("%s: closing: %s", self.peer, err)
            self._abort()

    def eof_received(self) -> bool | None:
        # The client closed its side: finish what is in flight, send the replies, then close.
        self.closing = True
        self._maybe_close()
        return True

    # -- handshake ----------------------------------------------------------------------------------------------
    def _handshake_data(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        events = hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        for event in events:
            if isinstance(event, Aborted):
                self._close()
                return
            if isinstance(event, Ready):
                negotiated = event.negotiated
                self.handshake = None
                self.tx = Transmission(negotiated, self.server.allocate_payload)
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                self.structured = negotiated.structured
                if event.trailing:
                    self._transmission_data(event.trailing)
                return

    # -- transmission -------------------------------------------------------------------------------------------
    def _transmission_data(self, data: bytes) -> None:
        assert self.tx is not None
        self._dispatch(self.tx.receive_data(data))

    def _dispatch(self, events: list[Any]) -> None:
        if not events:
            return
        server = self.server
        server.stats.requests += len(events)
        out = self._out
        disk = self.disk
        read_inline = server.read_inline
        nowait_fd = server.nowait_fd
        sendfile_fd = server.fast_read_fd if self._sock_fd >= 0 else None
        aio = server.aio
        aio_fd = server.aio_fd
        aio_align = server.aio_align
        inline_write = server.inline_writes
        structured = self.structured
        read_header = replies.read_header
        read_header_into = replies.read_header_into
        header_size = replies.read_header_size(structured)
        for index, ev in enumerate(events):
            if ev.__class__ is Request:
                if self._congested():
                    # The client is not reading replies fast enough, or too much is in flight: keep the
                    # rest for later (reading stays paused meanwhile), so memory stays bounded.
                    self._backlog.extend(events[index:])
                    self._update_reading()
                    break
                cmd = ev.command
                if server.shutting_down:
                    out.append(replies.error(structured, ev.cookie, cmd, c.ESHUTDOWN, "server shutting down"))
                    continue
                if cmd == c.CMD_READ and read_inline is not None:
                    if ev.length >= SENDFILE_MIN and sendfile_fd is not None:
                        if out:
                            self._send()
                        if self._sendfile(ev, sendfile_fd):
                            continue
                    if nowait_fd is not None:
                        # Page-cache hit or not? RWF_NOWAIT answers without waiting: a miss (or a partly
                        # cached range) goes to the pool, so a cold cache does not stall the event loop.
                        # A small reply is read straight in behind its header: one buffer, no join.
                        small = ev.length < LARGE_REPLY
                        skip = header_size if small else 0
                        data_out = bytearray(skip + ev.length)
                        try:
                            got = os.preadv(nowait_fd, [memoryview(data_out)[skip:]], ev.offset, os.RWF_NOWAIT)
                        except OSError:
                            got = -1
                        if got != ev.length:
                            self._submit(ev)
                            continue
                        if small:
                            read_header_into(data_out, structured, ev.cookie, ev.offset, ev.length)
                            out.append(data_out)
                            continue
                    else:
                        try:
                            data_out = read_inline(ev.length, ev.offset)
                        except Exception as exc:
                            server.stats.errors += 1
                            out.append(replies.error(structured, ev.cookie, cmd, _error_of(exc, cmd), str(exc)))
                            continue
                    if len(data_out) < ev.length:
                        data_out += bytes(ev.length - len(data_out))
                    hdr = read_header(structured, ev.cookie, ev.offset, ev.length)
                    if ev.length >= LARGE_REPLY:
                        out.append(hdr)
                        out.append(data_out)
                        self._out_size += ev.length
                        if self._out_size >= SEND_EARLY:
                            self._send()  # lets the transport report back-pressure before the next read
                    else:
                        out.append(hdr + data_out)
                elif (
                    cmd == c.CMD_WRITE
                    and inline_write
                    and not ev.flags & c.CMD_FLAG_FUA
                    and ev.length < INLINE_WRITE_MAX
                ):
                    try:
                        disk.pwrite(ev.data, ev.offset)
                    except Exception as exc:
                        server.stats.errors += 1
                        out.append(replies.simple(ev.cookie, _error_of(exc, cmd)))
                        continue
                    finally:
                        if ev.buffer is not None:
                            self._recycle(ev)
                    out.append(replies.simple(ev.cookie))
                elif aio is not None and cmd <= c.CMD_WRITE and not (ev.offset | ev.length) % aio_align:
                    if not self._aio(ev, aio, aio_fd):
                        self._submit(ev)
                else:
                    self._submit(ev)
            elif ev.__class__ is Rejected:
                server.stats.errors += 1
                log.debug("%s: rejected: %r", self.peer, ev)
                out.append(ev.reply)
            else:  # Disconnect
                self.closing = True
        if out:
            self._send()
        if self.closing:
            self._maybe_close()

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

    def _aio(self, req: Request, aio: Any, fd: int) -> bool:
        """Start an aligned READ, or a WRITE that needs no durability of its own, with native AIO.

        Returns False (nothing started) for anything else, or when the AIO context is full.
        """
        from cachemode.nbd.aio import IOCB_CMD_PREAD, IOCB_CMD_PWRITE

        length = req.length
        if req.command == c.CMD_WRITE:
            disk = self.disk
            # FUA, the guest cache off, or O_DSYNC: the stack decides how the write is made durable.
            if req.flags & c.CMD_FLAG_FUA or disk.mode.every_write_durable(disk.write_cache):
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
                    self._send_direct(hdr, buf, length)
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
            self._completed(req, replies.simple(cookie, _error_of(OSError(-res, os.strerror(-res)), c.CMD_WRITE)))
        else:  # a short write: let the stack finish the rest
            self.server.note_write()
            self._finish(req)
            rest = Request(c.CMD_WRITE, 0, cookie, req.offset + res, length - res, memoryview(req.data)[res:])
            self._submit(rest)

    def _send_direct(self, hdr: bytes, buf: Any, length: int) -> None:
        """Write ``hdr`` + ``buf[:length]`` with writev when nothing is queued before it; queue the rest."""
        transport = self.transport
        if transport is None:
            return
        sent = 0
        if self._sock_fd >= 0 and not transport.get_write_buffer_size():
            with memoryview(buf) as view:
                try:
                    sent = os.writev(self._sock_fd, [hdr, view[:length]])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._abort()
                    return
        total = len(hdr) + length
        if sent >= total:
            return
        if sent < len(hdr):
            transport.write(hdr[sent:] + buf[:length])
        else:
            transport.write(buf[sent - len(hdr) : length])

    def _after_completion(self) -> None:
        if self.closing:
            self._maybe_close()

    def _start(self, req: Request) -> None:
        self.in_flight += 1
        if req.command <= c.CMD_WRITE:
            self.in_flight_bytes += req.length
        if self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES:
            self._update_reading()

    def _finish(self, req: Request) -> None:
        self.in_flight -= 1
        if req.command <= c.CMD_WRITE:
            self.in_flight_bytes -= req.length
        if self._paused_reading:
            self._update_reading()
        if self._backlog and not self._draining:
            self.loop.call_soon(self._drain_backlog)

    def _congested(self) -> bool:
        return self._paused_writing or self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES

    def _drain_backlog(self) -> None:
        """Handle requests parsed earlier but held back while the connection was congested."""
        if self._draining or not self._backlog or self.closed:
            return
        self._draining = True
        try:
            events = list(self._backlog)
            self._backlog.clear()
            self._dispatch(events)
        finally:
            self._draining = False
        self._update_reading()

    def _submit(self, req: Request) -> None:
        self._start(req)
        self.server.pool.submit(self._execute, req, self._completed)

    def _execute(self, req: Request) -> bytes | tuple[bytes, Any]:
        """Run one request against the disk (in a pool thread); return the reply bytes."""
        disk = self.disk
        cmd = req.command
        fua = bool(req.flags & c.CMD_FLAG_FUA)
        cookie = req.cookie
        structured = self.structured
        try:
            if cmd == c.CMD_READ:
                data = disk.pread(req.length, req.offset)
                return (replies.read_header(structured, cookie, req.offset, req.length), data)
            if cmd == c.CMD_WRITE:
                disk.pwrite(req.data, req.offset, fua=fua)
            elif cmd == c.CMD_FLUSH:
                disk.flush()
                self.server.stats.flushes += 1
            elif cmd == c.CMD_TRIM:
                disk.trim(req.offset, req.length, fua=fua)
            elif cmd == c.CMD_WRITE_ZEROES:
                disk.zero(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & c.CMD_FLAG_NO_HOLE,
                    fua=fua,
                    fast=bool(req.flags & c.CMD_FLAG_FAST_ZERO),
                )
            elif cmd == c.CMD_CACHE:
                disk.cache(req.offset, req.length)
            elif cmd == c.CMD_BLOCK_STATUS:
                extents = disk.block_status(req.offset, req.length)
                descriptors = replies.clip_extents(
                    extents, req.offset, req.length, bool(req.flags & c.CMD_FLAG_REQ_ONE)
                )
                ctx = self.tx.meta_context_id if self.tx is not None else None
                return replies.block_status(cookie, ctx or 0, descriptors)
            else:  # validation makes this unreachable
                return replies.error(structured, cookie, cmd, c.EINVAL, "unknown command")
        except Exception as exc:
            self.server.stats.errors += 1
            if not hasattr(exc, "errno"):
                log.exception("%s: %s failed", self.peer, c.COMMAND_NAMES.get(cmd, cmd))
            return replies.error(structured, cookie, cmd, _error_of(exc, cmd), str(exc))
        return replies.simple(cookie)

    def _recycle(self, req: Request) -> None:
        """Give a finished WRITE's payload buffer back to the pool."""
        buf = req.buffer
        req.buffer = None
        if buf is None or not self.server.recycle or not isinstance(buf, mmap.mmap):
            return
        if isinstance(req.data, memoryview):
            req.data.release()
        self.server.buffers.release(buf)

    def _completed(self, req: Request, result: Any) -> None:
        self._finish(req)
        if req.buffer is not None:
            self._recycle(req)
        if self.closed:
            return
        if isinstance(result, BaseException):
            result = replies.error(self.structured, req.cookie, req.command, c.EIO, str(result))
        if isinstance(result, tuple):
            self._out.extend(result)
        else:
            self._out.append(result)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._send)
        if self.closing:
            self._maybe_close()

    # -- output and lifetime ----------------------------------------------------------------------------------
    def _send(self) -> None:
        self._flush_scheduled = False
        self._out_size = 0
        out = self._out
        if not out or self.closed or self.transport is None:
            out.clear()
            return
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.writelines(out)
        out.clear()

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        pause = self._congested() or bool(self._backlog)
        if pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not pause and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.in_flight == 0 and not self._backlog and not self.closed:
            self._send()
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # sends what is buffered, then closes

    def _abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def begin_shutdown(self) -> None:
        """Refuse new work (ESHUTDOWN), finish what is in flight, then close."""
        self.closing = True
        if self.tx is None:
            self._close()
        else:
            self._maybe_close()

    async def wait_closed(self) -> None:
        await self._done.wait()


class IOPool:
    """A minimal thread pool for requests that wait on the device.

    Lighter than ``run_in_executor``: no futures, one C-level queue in, and completions gathered in a deque
    that the event loop drains in one callback however many finished meanwhile (one wake-up per batch, not
    per request). ``fn(arg)`` must not raise; ``callback(arg, result)`` runs in the loop thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int) -> None:
        self.loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Callable[[Any, Any], None], Any, Any]] = collections.deque()
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._worker, name=f"nbd-io-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[Any], Any], arg: Any, callback: Callable[[Any, Any], None]) -> None:
        self._queue.put((fn, arg, callback))

    def _worker(self) -> None:
        get = self._queue.get
        done = self._done
        while True:
            item = get()
            if item is None:
                return
            fn, arg, callback = item
            try:
                result = fn(arg)
            except BaseException as exc:  # pragma: no cover - fn handles its own errors
                result = exc
            done.append((callback, arg, result))
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody is waiting for the reply any more
                    return

    def _drain(self) -> None:
        self._wake_pending = False
        done = self._done
        while done:
            callback, arg, result = done.popleft()
            callback(arg, result)

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the pool and await its result (for rare calls such as the final flush)."""
        fut = self.loop.create_future()

        def call(_: Any) -> Any:
            try:
                return (True, fn())
            except BaseException as exc:
                return (False, exc)

        def finished(_: Any, result: Any) -> None:
            if not fut.done():
                ok, value = result
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        self.submit(call, None, finished)
        return await fut

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)


class Server:
    """An NBD server for one export backed by a :class:`cachemode.disk.VirtualDisk`.

    The disk is handed in ready-made, so other parts (the power-loss lab) can serve their own stack. The
    server never closes a disk it was given; :func:`serve` opens and closes its own.
    """

    def __init__(
        self,
        disk: Any,
        *,
        export_name: str = "",
        description: str = "",
        workers: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        handshake_limit: float = HANDSHAKE_LIMIT,
    ) -> None:
        self.disk = disk
        self.handshake_limit = handshake_limit
        self.export = ExportInfo.from_disk(disk, name=export_name, description=description)
        self.loop = loop or asyncio.get_event_loop()
        self._note_write: Callable[[], None] = lambda: None
        self.pool = IOPool(self.loop, workers or int(os.environ.get("CACHEMODE_NBD_WORKERS", "16")))
        self.stats = Stats()
        self.shutting_down = False
        self._connections: set[NBDConnection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self.address: str = ""
        self.uri: str = ""
        # Reads may bypass the stack only for a buffered image with nothing emulated in between; writes may
        # run inline only when they cannot wait on the device (no O_DIRECT, no O_DSYNC, no per-write FUA).
        blocking = bool(getattr(disk, "blocking", True))
        self.fast_read_fd: int | None = None if blocking else getattr(disk, "fast_read_fd", None)
        self.inline_writes = not blocking and not disk.read_only
        # O_DIRECT with the plain stack: aligned reads and plain writes may use native AIO (see aio.py).
        self.aio: Any = None
        self.aio_fd = -1
        self.aio_align = 1
        # Payload buffers are pooled (and reused once a write completed) only with the plain stack: a lab
        # layer might keep a reference to the data it was handed.
        self.recycle = _plain_stack(disk)
        self.buffers = BufferPool()
        if getattr(getattr(disk, "mode", None), "direct", False) and self.recycle:
            self.aio = open_aio(self.loop, pool=self.buffers)
            # Writes done by AIO bypass the mode layer: they are reported to its write counter, so the next
            # FLUSH is not skipped as "nothing written since the last one".
            self._note_write = disk.top.note_write
            if self.aio is not None:
                self.aio_fd = disk.image.fd
                self.aio_align = max(disk.image.alignment, 512)
        self.read_inline: Callable[[int, int], bytes] | None = None
        if not blocking:
            fd = self.fast_read_fd
            self.read_inline = functools.partial(os.pread, fd) if fd is not None else disk.pread
        self.nowait_fd: int | None = self.fast_read_fd if _nowait_works(self.fast_read_fd) else None

    def allocate_payload(self, length: int) -> Any:
        """The buffer a WRITE payload spanning several reads is received into: pooled page-aligned memory
        (which native AIO can also write as it is), else a bytearray."""
        if self.recycle and length >= 64 * 1024:
            return self.buffers.buffer(length)
        return bytearray(length)

    def note_write(self) -> None:
        """Tell the disk stack a write completed behind its back (native AIO), so the next FLUSH syncs."""
        self._note_write()

    def _factory(self) -> NBDConnection:
        return NBDConnection(self)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> int:
        """Listen on TCP; returns the bound port (useful with ``port=0``)."""
        srv = await self.loop.create_server(self._factory, host, port, reuse_address=True, backlog=128)
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()[1]
        hostpart = f"[{host}]" if ":" in host else host
        self.address = f"{host}:{bound}"
        self.uri = f"nbd://{hostpart}:{bound}/{self.export.name}"
        return int(bound)

    async def start_unix(self, path: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
        srv = await self.loop.create_unix_server(self._factory, path, backlog=128)
        self._servers.append(srv)
        self.address = path
        self.uri = f"nbd+unix:///{self.export.name}?socket={path}"
        return path

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish in-flight requests, close connections, flush the disk (unless unsafe)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        for srv in self._servers:
            srv.close()
        conns = list(self._connections)
        for conn in conns:
            conn.begin_shutdown()
        if conns:
            await asyncio.wait([asyncio.ensure_future(conn.wait_closed()) for conn in conns], timeout=timeout)
            for conn in conns:
                if not conn.closed:
                    conn._abort()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        # The disk applies the mode: flush syncs in writeback/none, is a no-op in unsafe and O_DSYNC modes.
        if self.aio is not None:
            self.aio.close()
        await self.pool.run(self.disk.flush)
        self.pool.shutdown()

    @property
    def connections(self) -> int:
        return len(self._connections)


def _nowait_works(fd: int | None) -> bool:
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


def _plain_stack(disk: Any) -> bool:
    """True for the stack open_disk builds by itself: mode layer, optional alignment layer, image file."""
    try:
        from cachemode.disk import ImageFile, ModeLayer
        from cachemode.disk.alignment import AlignmentLayer

        layers = disk.layers()
    except Exception:
        return False
    kinds = [type(layer) for layer in layers]
    return (
        bool(kinds)
        and kinds[0] is ModeLayer
        and kinds[-1] is ImageFile
        and all(k is AlignmentLayer for k in kinds[1:-1])
        and layers[-1] is disk.image
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    disk: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 10809,
    socket_path: str | None = None,
    export_name: str = "",
    description: str = "",
    on_ready: Callable[[Server], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Server:
    """Serve ``disk`` in the foreground until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly.

    ``on_ready`` is called once the socket listens (the command prints the URI there). Returns the server,
    after shutdown, so the caller can read its stats. The disk is flushed but not closed.
    """
    import signal

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(disk, export_name=export_name, description=description, loop=loop)

    async def main() -> None:
        done = stop or asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            if socket_path:
                await server.start_unix(socket_path)
            else:
                await server.start_tcp(host, port)
            if on_ready is not None:
                on_ready(server)
            await done.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await server.shutdown()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    return server
