"""One NBD client connection: the handshake, then transmission -- parsing by the sans-IO core, dispatch to the
disk (inline, the thread pool, or the direct paths of :mod:`cachemode.nbd.direct`), replies in completion order,
and the back-pressure that keeps its memory within its budget (:mod:`cachemode.nbd.budget`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any

from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd._batch import read_batch, serve_reads, splice_writes, write_batch
from cachemode.nbd.budget import SMALL_REPLY, TRANSPORT_HIGH_WATER, cost
from cachemode.nbd.direct import LARGE_REPLY, DirectPaths, pwrite_all
from cachemode.nbd.handshake import Aborted, Handshake, ProtocolError, Ready, StartTLS
from cachemode.nbd.replies import SIMPLE_HEADER_SIZE
from cachemode.nbd.requests import PayloadFollows, ReadRun, Rejected, Request, Transmission, Violation, WriteRun
from cachemode.nbd.splice import SPLICE_MAX, SPLICE_MIN
from cachemode.nbd.tls import start_tls

if TYPE_CHECKING:
    from cachemode.nbd.server import Server

log = logging.getLogger("cachemode.nbd")

HANDSHAKE_LIMIT = 10.0
"""Seconds a client may take to finish negotiating before it is dropped (qemu-nbd's --handshake-limit)."""
MAX_IN_FLIGHT = 64
"""Requests outstanding per connection before the server stops reading from it (memory is bounded by the
connection's budget, :mod:`cachemode.nbd.budget`; this bounds the work queued for the pool and the AIO context)."""
INLINE_WRITE_MAX = 256 * 1024
"""Page-cache writes below this size run inline; larger ones go to the pool, so the kernel's copy of one
payload overlaps with receiving the next."""
SEND_EARLY = 1024 * 1024
"""Inline read data queued in one batch before it is handed to the transport (so back-pressure is seen)."""
SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_SNDBUF asked for each connection (the kernel doubles it)."""
REPLY_ARENA = 256 * 1024
"""The arena the replies to small inline READs and WRITEs of one batch are built in, READ data read straight
in behind its header: one buffer for the transport instead of one per reply."""
READ_AHEAD = 16
"""Requests read straight from the socket after a spliced WRITE, at most, before the event loop gets a turn."""
SENDFILE_MIN = 128 * 1024
"""Buffered reads at least this long go from the image to the socket with sendfile(2), no copy in Python."""


class Stats:
    """Counters a test, the demo or the lab can read."""

    __slots__ = ("connections", "errors", "flushes", "fused_reads", "mapped_writes", "refused", "requests")

    def __init__(self) -> None:
        self.connections = 0
        self.refused = 0
        self.requests = 0
        self.fused_reads = 0  # of the requests, READs served by the fused call (_serve_reads)
        self.mapped_writes = 0  # of the requests, large WRITEs stored through the mapped image (_splice_run)
        self.flushes = 0
        self.errors = 0


class NBDConnection(DirectPaths, asyncio.BufferedProtocol):
    """One client connection: handshake, then transmission."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.disk = server.disk
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.handshake: Handshake | None = Handshake(server.export, tls=server.tls_mode)
        self.tls = False  # the connection runs TLS (see cachemode.nbd.tls)
        self.tx: Transmission | None = None
        self.structured = False
        self.in_flight = 0
        self.ledger = server.budget.ledger(self._retry)  # the memory this connection makes the server hold
        self._batch_cost = 0  # admitted in this batch, not in flight: released once the replies are handed on
        self._out_cost = 0  # completed requests whose replies wait in _out
        self._backlog: collections.deque[Any] = collections.deque()  # parsed, held back while congested
        self._draining = False
        self._retry_pending = False
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
        self._splicer: Any = None  # a PayloadSplicer once this connection splices its first WRITE payload
        self._splicing: Request | None = None  # the WRITE being spliced: the transport must not read meanwhile
        self._arena_sent = False  # _out holds part of the server's reply arena (see _send)
        self._read_on = False  # a payload was spliced whole in this callback: read the next request at once
        self._note_pending = False  # inline writes not yet reported to the mode layer (see _note_writes)
        self._awaiting = False  # reading paused until the socket holds the next large WRITE whole (_await_payload)
        self._lowat = 1  # the socket's SO_RCVLOWAT
        self._whole_payloads = False  # wait for a large WRITE's whole payload in the socket (TCP: _splice_run)
        self._splice_running = False  # inside _splice_run (whose replies sit in the shared arena, unsent)
        self._missed_run: ReadRun | None = None  # its first READ missed the page cache in _serve_reads

    # -- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if not self.server.register(self):  # --max-connections: closed before the greeting
            self.closed = True
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            with contextlib.suppress(OSError):
                # Room for a few large read replies in the kernel, so sendfile completes in one call.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        if sock is not None:
            self._sock = sock
            self._sock_fd = sock.fileno()
            self._whole_payloads = sock.family in (socket.AF_INET, socket.AF_INET6)
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
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
        if self._note_pending:
            self._note_writes()
        # Payloads paid for when their buffers were handed out and never executed: the one being received, and
        # requests held back with their payloads complete (prepaid: ``buffer`` set).
        unpaid = [ev.length for ev in self._backlog if ev.__class__ is Request and ev.buffer is not None]
        if self.tx is not None and self.tx.receiving:
            unpaid.append(self.tx.receiving)
        self._backlog.clear()
        self.ledger.release(self._batch_cost + self._out_cost + sum(cost(c.CMD_WRITE, n) for n in unpaid))
        self._batch_cost = self._out_cost = 0
        if self._splicer is not None:
            self._splicer.close()  # a payload being spliced is dropped (nothing of it was written): its charge too
            if self._splicing is not None:
                self.in_flight -= 1
                self.ledger.release(cost(c.CMD_WRITE, self._splicing.length))
                self._splicing = None
        self.ledger.close()  # requests still in flight release their share as they complete
        self.server.connection_closed(self)
        self._done.set()

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._account_queued()
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._account_queued()
        self._retry()

    def get_buffer(self, sizehint: int) -> memoryview:
        # In transmission the parser hands out its own buffer: a WRITE payload is received in place. Anything
        # else goes to one scratch buffer shared by all connections (the core copies out what it keeps), so
        # an idle connection owns no buffer at all.
        if self.tx is not None and not self.tx.closed:
            return self.tx.get_buffer()
        return self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            if self.tx is None:
                self._handshake_data(bytes(self.server.scratch[:nbytes]))
            elif not self.tx.closed:
                start, missed = self._serve_reads(nbytes) if self._sock_fd >= 0 else (0, False)
                if start < nbytes:
                    events = self.tx.buffer_updated(nbytes, start)
                    if missed and events and events[0].__class__ is ReadRun:
                        self._missed_run = events[0]  # read asynchronously without a second probe (_dispatch)
                    self._receive(events)
                if self._read_on:
                    self._read_ahead()
        except ProtocolError as err:
            log.info("%s: closing: %s", self.peer, err)
            self._abort()

    def _serve_reads(self, nbytes: int) -> tuple[int, bool]:
        """Serve the leading run of small plain READs among the ``nbytes`` just received into the scratch
        buffer with one C call (``_batch.serve_reads``: the core's own scan and the READ fast path of
        :meth:`_dispatch`, fused), and hand their replies to the transport; return how many of the bytes it
        took (0: none, the core parses them all). Most wakes of a connection reading at random bring nothing
        else, and the interpreter's work per wake on the core's path -- events, admission, dispatch, the
        replies' bookkeeping -- cost more CPU than the reads (see docs/nbd.md). Only where reading need not
        wait (:meth:`_must_pause`: nothing held back, below the in-flight bound, budget left, no payload being
        spliced) and no payload is awaited, not closing or shutting down. The charge of the run is taken and
        released within the call (``room`` bounds it), so the ledger sees only what the transport keeps. Also
        whether it stopped at a READ the page cache could not serve at once: that one has started the page's
        read, and is read asynchronously without a second probe (which may find the page by then)."""
        tx = self.tx
        assert tx is not None
        limits = tx.read_limits()
        server = self.server
        if limits is None or self.closing or server.shutting_down or self._awaiting or self._must_pause():
            return 0, False
        arena = self._next_arena(None, 0, 0)
        scratch, size, max_block, unaligned, max_length = limits
        pos, at, count, missed = serve_reads(
            scratch,
            0,
            nbytes,
            size,
            max_block,
            unaligned,
            max_length,
            server.nowait_fd,
            arena,
            0,
            self.structured,
            self.ledger.room(),
            SMALL_REPLY,
            MAX_IN_FLIGHT - self.in_flight,
        )
        if count:
            stats = server.stats
            stats.requests += count
            stats.fused_reads += count
            transport = self.transport
            assert transport is not None
            transport.write(arena[:at])
            if transport.get_write_buffer_size():  # the transport holds a view of the arena: a fresh one next
                server.reply_arena = None
                self._account_queued()
                self._update_reading()
        return pos, missed

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
        # The client closed its side: finish what is in flight, send the replies, then close. (TLS closes the
        # connection after the client's close_notify whatever this returns.)
        self.closing = True
        self._maybe_close()
        return None if self.tls else True

    def _read_ahead(self) -> None:
        """A large WRITE's payload was just spliced whole, so its client is streaming and the next request is
        probably in the socket already: read it here, into the parser's buffer as the transport would, and
        go on while that keeps being so -- a few times at most, so that other connections get their turn --
        instead of a round through the event loop (a poll, a read callback, the transport's pause and
        resume) per request. Only where the connection splices, i.e. owns its socket (never under TLS)."""
        tx = self.tx
        fd = self._sock_fd
        for _ in range(READ_AHEAD):
            self._read_on = False
            if self.closed or self.closing or self._must_pause() or tx is None or tx.closed or fd < 0:
                return
            need = self._splice_run(tx)[1]
            if need:
                self._await_payload(need)
                return
            if self.closed or self._paused_reading or self._splicing is not None:
                return
            try:
                n = os.readv(fd, [tx.get_buffer()])
            except OSError:  # nothing there (or the socket failed): the transport takes over, and sees it too
                return
            if not n:  # end of stream: left for the transport to see
                return
            self._receive(tx.buffer_updated(n))
            if not self._read_on:
                return

    def _splice_run(self, tx: Transmission, wait: bool = True) -> tuple[int, int]:
        """Large plain WRITEs waiting whole in the socket, one after another, spliced into the image by one C
        call (``_batch.splice_writes``: the header peeked, taken only where the core would take it the same
        way, its payload socket -> pipe -> image, its reply into the arena), as far as the in-flight bound, the
        budget and the arena allow; what it does not take is left in the socket for the core. A payload waited
        for whole, over pages all dirty in the page cache, is received straight into the mapped image instead
        (``server.write_map``; counted in ``stats.mapped_writes``): that skips the filesystem's write path. One
        taken as it comes goes from the pipes into the mapping once it is whole, where its pages are so.

        Returns how many requests it took, and how many bytes the socket must hold for the next one (see
        ``splice_writes``), for :meth:`_await_payload`: with ``wait``, a WRITE is taken only with its whole
        payload in the socket; 0 where there is nothing to wait for. Without, a payload not all there yet goes
        on in the splicer, from what the C call put in the pipes.

        Only a TCP socket waits for whole payloads. A Unix socket never holds one: it holds what the client's
        send buffer allows (about 208 KiB by default), and its poll ignores SO_RCVLOWAT, so each wait would
        wake at once and find the payload short (measured: 70 system calls and 1.2x nbdkit's CPU per 1 MiB
        WRITE). There a payload is taken as it comes, and only a header is waited for."""
        splicer = self._splicer
        limits = tx.splice_limits()
        if limits is None or splicer is None or self._splicing is not None or self._backlog:
            return 0, 0
        server = self.server
        pipes = splicer.pipes
        most = MAX_IN_FLIGHT - self.in_flight
        ledger = self.ledger
        room = ledger.room()
        if pipes[1] < 0 or most <= 0 or room <= 0 or server.shutting_down or server.splice_fd is None:
            return 0, 0
        size, max_block, unaligned, low, high = limits
        arena = self._next_arena(None, 0, 0)
        try:
            count, apos, charged, errors, partial, need, mapped = splice_writes(
                self._sock_fd, *pipes, server.splice_fd, arena, 0, size, max_block, unaligned, low,
                min(high, splicer.capacity), room, SMALL_REPLY, most, wait and self._whole_payloads, server.write_map,
            )  # fmt: skip
        except OSError as err:  # the socket or a pipe failed inside a request it took: this stream is lost
            log.info("%s: closing: %s", self.peer, err)
            self._abort()
            return 0, 0
        if not count:
            return 0, need
        server.stats.requests += count
        server.stats.mapped_writes += mapped
        self._note_pending = True  # the mode layer is told before any of the replies goes out (_note_writes)
        ledger.charge(charged)
        self._batch_cost += charged
        for cookie, error in errors:
            server.stats.errors += 1
            code = replies.error_of(OSError(error, os.strerror(error)), c.CMD_WRITE)
            self._out.append(replies.simple(cookie, code))
        if apos:
            self._out.append(arena[:apos])
            self._arena_sent = True
        if partial is not None:
            cookie, offset, length, in_first, in_second = partial
            req = Request(c.CMD_WRITE, 0, cookie, offset, length)
            self._splicing = req
            self._start(req)
            self._splice_running = True  # should the rest be there now, no read-ahead from inside this call
            try:
                splicer.resume(req, in_first, in_second, self._splice_done)
            finally:
                self._splice_running = False
        self._send()
        if self._splicing is not None:  # waiting for the socket: the transport must not read meanwhile
            self._update_reading()
        return count, 0 if self.closed else need

    def _await_payload(self, need: int) -> None:
        """Sleep until the socket holds ``need`` bytes (the next large WRITE whole, or a header), then splice
        on (:meth:`_on_awaited`); with ``need`` 0, hand reading back to the transport.

        A streaming client's 1 MiB payload arrives in dozens of segments. Woken by the transport for each, the
        server would receive header and first bytes into memory and splice the rest as it trickles in, through
        the event loop each time; with SO_RCVLOWAT the kernel wakes it once the whole request is there, and
        one C call takes it. The transport stays paused meanwhile (it would read the payload into memory), and
        the socket's low-water mark goes back to 1 before it reads again. On a Unix socket (no mark, see
        :meth:`_splice_run`) only a header is waited for, and any bytes wake it."""
        splicer = self._splicer
        if not need or splicer is None or self.closing or self.closed:
            self._stop_awaiting()
            return
        if self._lowat != need:
            try:
                self._set_lowat(need)
            except OSError:  # the socket failed: the transport finds out
                self._stop_awaiting()
                return
        splicer.watch(self._on_awaited)
        if not self._awaiting:
            self._awaiting = True
            self._update_reading()

    def _set_lowat(self, need: int) -> None:
        """The socket's SO_RCVLOWAT, on TCP: a Unix socket's poll ignores it, so there only the record of what
        is waited for changes (:meth:`_on_awaited` compares with it)."""
        if self._whole_payloads:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
        self._lowat = need

    def _stop_awaiting(self) -> None:
        if self._splicer is not None:
            self._splicer.unwatch(self._on_awaited)
        if self._lowat != 1 and not self.closed:
            with contextlib.suppress(OSError):
                self._set_lowat(1)
            self._lowat = 1
        if self._awaiting:
            self._awaiting = False
            self._update_reading()

    def _on_awaited(self) -> None:
        """The socket holds what :meth:`_await_payload` waited for (or came to its end, or failed)."""
        tx = self.tx
        if self.closed or tx is None or tx.closed:
            self._stop_awaiting()
            return
        lowat = self._lowat
        taken, need = self._splice_run(tx)
        if not taken and need == lowat and not self.closed:
            # Woken with less than that (the kernel does so under memory pressure, or when the receive window
            # is nearly shut): take what is there, as without waiting, so that this does not spin; if even
            # that takes nothing (part of a header), the transport reads it.
            self._splicer.unwatch(self._on_awaited)  # type: ignore[union-attr]
            taken = self._splice_run(tx, wait=False)[0]
            need = self._splice_run(tx)[1] if taken and self._splicing is None else 0
        self._await_payload(need)

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
            if isinstance(event, StartTLS):
                self._sock_fd = -1  # from now on every byte goes through the TLS transport
                assert self.server.tls is not None
                start_tls(self, self.server.tls.context)
                return
            if isinstance(event, Ready):
                negotiated = event.negotiated
                self.handshake = None
                # Large plain WRITE payloads are spliced from the socket -- never behind a TLS layer. Those
                # too large for the pipe are received into a buffer, which the budget may make them wait for.
                stream_min = SPLICE_MIN if self.server.splice_fd is not None and self._sock_fd >= 0 else 0
                self.tx = Transmission(
                    negotiated,
                    self._allocate_payload,
                    self.server.scratch,
                    allocate_alone=True,
                    stream_min=stream_min,
                    stream_max=SPLICE_MAX,
                    batch_reads=LARGE_REPLY if self.server.nowait_fd is not None else 0,
                    batch_writes=INLINE_WRITE_MAX if self.server.write_fd >= 0 else 0,
                )
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                self.structured = negotiated.structured
                if event.trailing:
                    self._transmission_data(event.trailing)
                return

    def tls_established(self, transport: Any) -> None:
        """The TLS handshake succeeded (:mod:`cachemode.nbd.tls`): negotiation starts again over ``transport``."""
        self.transport = transport
        self.tls = True
        assert self.handshake is not None
        self.handshake.tls_started()

    # -- transmission -------------------------------------------------------------------------------------------
    def _transmission_data(self, data: bytes) -> None:
        assert self.tx is not None
        self._receive(self.tx.receive_data(data))

    def _receive(self, events: list[Any]) -> None:
        """Dispatch what one read brought, then retry whatever it left waiting for memory."""
        self._draining = True  # no retry from inside the batch: requests run in the order they came
        try:
            self._dispatch(events)
        finally:
            self._draining = False
        if self._backlog or self._retry_pending or (self.tx is not None and self.tx.waiting):
            self._retry()

    def _dispatch(self, events: list[Any]) -> None:
        if not events:
            return
        server = self.server
        server.stats.requests += len(events)
        out = self._out
        read_inline = server.read_inline
        nowait_fd = server.nowait_fd
        sendfile_fd = server.fast_read_fd if self._sock_fd >= 0 else None
        aio = server.aio
        uring = server.uring
        aio_fd = server.aio_fd
        aio_align = server.aio_align
        inline_write = server.inline_writes
        write_inline = server.write_inline
        write_fd = server.write_fd
        pwrite = os.pwrite
        simple_into = replies.simple_into
        structured = self.structured
        read_header = replies.read_header
        read_header_into = replies.read_header_into
        header_size = replies.read_header_size(structured)
        preadv = os.preadv
        nowait = getattr(os, "RWF_NOWAIT", 0)
        ledger = self.ledger
        # Replies to small inline READs and WRITEs are built in the server's reply arena: [astart, apos) is this
        # batch's.
        arena = self.server.reply_arena
        arena_size = len(arena) if arena is not None else 0
        apos = astart = 0
        for index, ev in enumerate(events):
            if ev.__class__ is Request:
                cmd = ev.command
                amount = ev.length + SMALL_REPLY if cmd <= c.CMD_WRITE else cost(cmd, ev.length)
                # A WRITE whose payload buffer was allocated was charged then; anything else is admitted
                # only while it fits in the connection's budget and the server's (see budget.py).
                if self.in_flight >= MAX_IN_FLIGHT or (ev.buffer is None and not ledger.admit(amount)):
                    # The client is not reading replies fast enough, or too much is in flight: keep the
                    # rest for later (reading stays paused meanwhile), so memory stays bounded.
                    self._backlog.extend(events[index:])
                    self._update_reading()
                    break
                self._batch_cost += amount
                if server.shutting_down:
                    out.append(replies.error(structured, ev.cookie, cmd, c.ESHUTDOWN, "server shutting down"))
                    continue
                if cmd == c.CMD_READ and read_inline is not None:
                    if ev.length >= SENDFILE_MIN and sendfile_fd is not None:
                        if apos > astart:
                            out.append(arena[astart:apos])
                            self._arena_sent = True
                            astart = apos
                        if out:
                            self._send()
                        if self._sendfile(ev, sendfile_fd):
                            continue
                    if nowait_fd is not None:
                        # Page-cache hit or not? RWF_NOWAIT answers without waiting: a miss (or a partly
                        # cached range) is read with io_uring (else on the pool), so a cold cache does not
                        # stall the event loop. Small replies are read straight into the server's reply
                        # arena, each behind its header: the batch's replies go out as one buffer.
                        length = ev.length
                        offset = ev.offset
                        if length < LARGE_REPLY:
                            end = apos + header_size + length
                            if end > arena_size:
                                arena = self._next_arena(arena, astart, apos)
                                arena_size = len(arena)
                                apos = astart = 0
                                end = header_size + length
                            try:
                                got = preadv(nowait_fd, [arena[apos + header_size : end]], offset, nowait)
                            except OSError:
                                got = -1
                            if got == length:
                                read_header_into(arena, structured, ev.cookie, offset, length, apos)
                                apos = end
                                continue
                            data_out = bytearray(header_size + length)
                            if uring is None or not self._uring_read(ev, uring, data_out, header_size):
                                self._submit(ev)
                            continue
                        data_out = bytearray(length)
                        try:
                            got = preadv(nowait_fd, [data_out], offset, nowait)
                        except OSError:
                            got = -1
                        if got != length:
                            if uring is None or not self._uring_read(ev, uring, data_out, 0):
                                self._submit(ev)
                            continue
                    else:
                        try:
                            data_out = read_inline(ev.length, ev.offset)
                        except Exception as exc:
                            server.stats.errors += 1
                            out.append(replies.error(structured, ev.cookie, cmd, replies.error_of(exc, cmd), str(exc)))
                            continue
                    if len(data_out) < ev.length:
                        data_out += bytes(ev.length - len(data_out))
                    hdr = read_header(structured, ev.cookie, ev.offset, ev.length)
                    if ev.length >= LARGE_REPLY:
                        out.append(hdr)
                        out.append(data_out)
                        self._out_size += ev.length
                        if self._out_size >= SEND_EARLY:
                            if apos > astart:
                                out.append(arena[astart:apos])
                                self._arena_sent = True
                                astart = apos
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
                        if write_fd >= 0:
                            # One pwrite on the image's fd (the plain stack would only pass it down); the mode
                            # layer is told once before any reply or flush goes out (see _note_writes).
                            self._note_pending = True
                            data = ev.data
                            done = pwrite(write_fd, data, ev.offset)
                            if done != ev.length:
                                pwrite_all(write_fd, data, ev.offset, done)
                        else:
                            write_inline(ev.data, ev.offset)
                    except Exception as exc:
                        server.stats.errors += 1
                        out.append(replies.simple(ev.cookie, replies.error_of(exc, cmd)))
                        continue
                    finally:
                        if ev.buffer is not None:
                            self._recycle(ev)
                    end = apos + SIMPLE_HEADER_SIZE
                    if end > arena_size:
                        arena = self._next_arena(arena, astart, apos)
                        arena_size = len(arena)
                        apos = astart = 0
                        end = SIMPLE_HEADER_SIZE
                    simple_into(arena, apos, ev.cookie)
                    apos = end
                elif aio is not None and cmd <= c.CMD_WRITE and not (ev.offset | ev.length) % aio_align:
                    if not self._aio(ev, aio, aio_fd):
                        self._submit(ev)
                else:
                    self._submit(ev)
            elif ev.__class__ is ReadRun:
                # Small plain READs, served from the page cache into the arena by one C call per stretch (as
                # far as the budget, the in-flight bound and the arena allow: the call takes only what fits);
                # what is left goes on below one by one, as Requests.
                count = len(ev)
                server.stats.requests += count - 1
                i = 0
                known = 0  # leading READs known to miss (see _serve_reads)
                if ev is self._missed_run:
                    self._missed_run = None
                    known = 1
                if nowait_fd is not None and not server.shutting_down:
                    while i < count:
                        if not arena_size:
                            arena = self._next_arena(None, 0, 0)
                            arena_size = len(arena)
                            apos = astart = 0
                        room = ledger.room()
                        stop = i + MAX_IN_FLIGHT - self.in_flight
                        if room <= 0 or stop <= i:
                            break
                        taken, apos, charged, misses = read_batch(
                            nowait_fd,
                            ev.entries,
                            i,
                            stop,
                            arena,
                            apos,
                            structured,
                            room,
                            SMALL_REPLY,
                            known if not i else 0,
                        )
                        if charged:
                            ledger.charge(charged)
                            self._batch_cost += charged
                        for miss in misses:  # not in the page cache: read asynchronously
                            req = ev.request(miss)
                            data_out = bytearray(header_size + req.length)
                            if uring is None or not self._uring_read(req, uring, data_out, header_size):
                                self._submit(req)
                        if taken == i:  # the arena is full (take the next one), else no room: one by one
                            if not apos:
                                break
                            arena = self._next_arena(arena, astart, apos)
                            arena_size = len(arena)
                            apos = astart = 0
                            continue
                        i = taken
                if i < count:
                    events[index + 1 : index + 1] = ev.requests(i)
            elif ev.__class__ is WriteRun:
                # Small plain WRITEs with their payloads, written to the image by one C call per stretch (copied
                # into the mapped image where their pages are cached: server.map_image), their replies into the
                # arena (as far as the budget and the arena allow); the rest one by one below.
                count = len(ev)
                server.stats.requests += count - 1
                i = 0
                if write_fd >= 0 and inline_write and not server.shutting_down:
                    while i < count:
                        if not arena_size:
                            arena = self._next_arena(None, 0, 0)
                            arena_size = len(arena)
                            apos = astart = 0
                        room = ledger.room()
                        if room <= 0:
                            break
                        self._note_pending = True  # before anything is written (see _note_writes)
                        taken, apos, charged, failed = write_batch(
                            write_fd, ev.entries, ev.payload, i, arena, apos, room, SMALL_REPLY, server.write_map
                        )
                        if charged:
                            ledger.charge(charged)
                            self._batch_cost += charged
                        for which, error in failed:
                            server.stats.errors += 1
                            code = replies.error_of(OSError(error, os.strerror(error)), c.CMD_WRITE)
                            out.append(replies.simple(ev.request(which).cookie, code))
                        if taken == i:  # the arena is full (take the next one), else no room: one by one
                            if not apos:
                                break
                            arena = self._next_arena(arena, astart, apos)
                            arena_size = len(arena)
                            apos = astart = 0
                            continue
                        i = taken
                if i < count:
                    events[index + 1 : index + 1] = ev.requests(i)
            elif ev.__class__ is PayloadFollows:
                # Its payload is still in the socket, but the request is admitted like any WRITE (and charged
                # its length: what of the payload the server does hold -- the head, a full pipe read out --
                # is less), so requests run in order and the in-flight bound holds.
                amount = cost(c.CMD_WRITE, ev.request.length)
                if self.in_flight >= MAX_IN_FLIGHT or not ledger.admit(amount):
                    self._backlog.extend(events[index:])
                    self._update_reading()
                    break
                self._batch_cost += amount
                self._splice_write(ev)
            elif ev.__class__ is Rejected:
                server.stats.errors += 1
                log.debug("%s: rejected: %r", self.peer, ev)
                out.append(ev.reply)
            elif ev.__class__ is Violation:
                # A bad request magic: what came before it is answered, then the connection closes --
                # however TCP cut the bytes.
                log.info("%s: closing: %s", self.peer, ev.message)
                self.closing = True
            else:  # Disconnect
                self.closing = True
        if apos > astart:
            out.append(arena[astart:apos])
            self._arena_sent = True
        if uring is not None:
            uring.submit()
        if aio is not None:
            aio.flush()
        if out or self._batch_cost or self._out_cost:
            self._send()
        if self.closing:
            self._maybe_close()
        else:
            self._update_reading()

    def _next_arena(self, arena: memoryview | None, start: int, end: int) -> memoryview:
        """The server's reply arena, empty, once ``arena[start:end]`` (this batch's replies in it so far, if
        any) has been handed to the transport. One arena is shared by every connection (the loop runs one
        batch at a time); a fresh one replaces it whenever a transport keeps part of it (see :meth:`_send`)."""
        if arena is not None and end > start:
            self._out.append(arena[start:end])
            self._arena_sent = True
            self._send()
        arena = self.server.reply_arena
        if arena is None:
            arena = self.server.reply_arena = memoryview(bytearray(REPLY_ARENA))
        return arena

    def _note_writes(self) -> None:
        """Tell the mode layer that inline writes happened (so the next FLUSH syncs them): once per batch,
        before any of their replies is handed on and before any request goes to the pool (a FLUSH)."""
        self._note_pending = False
        self.server.note_write()

    def _after_completion(self) -> None:
        self._send()  # releases the charge of the reply just handed on, and retries what waited for it
        if self.closing:
            self._maybe_close()

    def _start(self, req: Request) -> None:
        """``req`` goes in flight (pool or AIO): its charge stays held until its reply is handed on."""
        if self._note_pending:
            self._note_writes()
        self.in_flight += 1
        if self.closed:  # the rest of a short write, resubmitted after the client left: a fresh charge
            self.ledger.charge(cost(req.command, req.length))
        else:
            self._batch_cost -= cost(req.command, req.length)
        if self.in_flight >= MAX_IN_FLIGHT:
            self._update_reading()

    def _finish(self, req: Request) -> None:
        """``req`` completed: its charge is released once its reply is handed on (the next :meth:`_send`)."""
        self.in_flight -= 1
        if self.closed:
            self.ledger.release(cost(req.command, req.length))
        else:
            self._out_cost += cost(req.command, req.length)

    def _allocate_payload(self, length: int) -> Any:
        """The parser's WRITE payload buffer, charged to the budget now; None (the parser waits) if it does
        not fit yet."""
        if not self.ledger.admit(cost(c.CMD_WRITE, length)):
            return None
        return self.server.allocate_payload(length)

    def _retry(self) -> None:
        """Try again what waited for memory: requests held back first, then a WRITE payload the parser holds."""
        if self.closed:
            return
        if self._draining:  # called from inside a batch (a write made the transport resume): once it is over
            self._retry_pending = True
            return
        self._retry_pending = False
        self._draining = True
        try:
            if self._backlog:
                events = list(self._backlog)
                self._backlog.clear()
                self._dispatch(events)
            tx = self.tx
            while tx is not None and tx.waiting and not self._backlog and not self.closed:
                events = tx.resume()
                if not events:
                    break  # refused: the budget wakes this connection when memory frees
                self._dispatch(events)
        finally:
            self._draining = False
        if self.closing:
            self._maybe_close()
        self._update_reading()
        if self._retry_pending and not self.closed:
            self._retry_pending = False
            self.loop.call_soon(self._retry)

    def _account_queued(self) -> None:
        if self.transport is not None and not self.closed:
            self.ledger.set_queued(self.transport.get_write_buffer_size())

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
            return replies.error(structured, cookie, cmd, replies.error_of(exc, cmd), str(exc))
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
        if not self._flush_scheduled and not self._draining:  # inside a batch, its end sends it
            self._flush_scheduled = True
            self.loop.call_soon(self._send)
        if self.closing:
            self._maybe_close()

    # -- output and lifetime ----------------------------------------------------------------------------------
    def _send(self) -> None:
        """Hand the replies in ``_out`` to the transport; their charge becomes the transport's queued bytes."""
        self._flush_scheduled = False
        self._out_size = 0
        if self._note_pending:
            self._note_writes()
        out = self._out
        if out and not self.closed and self.transport is not None:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)
        out.clear()
        if self._arena_sent:
            # The transport wrote the arena's bytes at once, or it holds a view of them: then the arena is
            # the transport's until sent, and the server starts a fresh one.
            self._arena_sent = False
            if self._sock_fd < 0 or self.closed or self.transport is None or self.transport.get_write_buffer_size():
                self.server.reply_arena = None
        released = self._batch_cost + self._out_cost
        self._batch_cost = self._out_cost = 0
        self.ledger.release(released)
        self._account_queued()
        if self._backlog or (self.tx is not None and self.tx.waiting):
            if not self._draining:
                self._retry()
            elif released:
                self._retry_pending = True  # room freed inside a batch: retry once the batch is over
        elif self._paused_reading:
            self._update_reading()

    def _must_pause(self) -> bool:
        """Whether reading must wait: held-back requests, the in-flight bound, the budget, a payload the parser
        waits to have room for, or one being spliced."""
        return (
            bool(self._backlog)
            or self.in_flight >= MAX_IN_FLIGHT
            or self.ledger.full()
            or (self.tx is not None and self.tx.waiting)
            or self._splicing is not None
        )

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        pause = self._awaiting or self._must_pause()
        if pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not pause and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.in_flight == 0 and not self._backlog and not self.closed:
            if self.server.shutting_down and self._unread_requests():
                self._update_reading()  # answer them (ESHUTDOWN) first; this is called again after that
                return
            self._send()
            self._close()

    def _unread_requests(self) -> bool:
        """Whether the client sent more than has been parsed: a request half received, or bytes in the socket.

        Closing a socket with unread bytes makes the kernel reset the connection, and the client then loses
        replies already sent; so on shutdown such requests are read and answered first (bounded by the
        shutdown timeout, after which the connection is dropped).
        """
        if self.tx is not None and self.tx.buffered:
            return True
        if self._sock_fd < 0:
            return False
        try:
            pending = struct.unpack("i", fcntl.ioctl(self._sock_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return False
        return pending > 0

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
        self._stop_awaiting()  # what is in the socket is read by the transport and answered
        if self.tx is None:
            self._close()
        else:
            self._maybe_close()

    async def wait_closed(self) -> None:
        await self._done.wait()
