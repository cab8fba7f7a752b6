"""The asyncio transport around the sans-IO core: sockets in, disk calls, reply bytes out.

This module holds the :class:`Server` (listening, the shared disk paths, shutdown) and :func:`serve`; each client
is a :class:`~cachemode.nbd.connection.NBDConnection`, whose sendfile/AIO paths live in
:mod:`cachemode.nbd.direct`, and device-bound requests run on :class:`~cachemode.nbd.pool.IOPool`.

Everything the protocol decides (handshake, parsing, validation, reply layout) lives in the core; this module
only moves bytes and runs disk calls. The hot path is kept lean on purpose:

* buffered images (every mode but none/directsync; O_DSYNC only makes writes durable): a plain READ is one
  ``preadv(RWF_NOWAIT)`` on the image's fd (``disk.fast_read_fd``) run inline in the event loop -- a
  page-cache hit costs no thread hand-off, a miss is read with io_uring (:mod:`cachemode.nbd.uring`; the
  pool where that is unavailable) -- and reads of 128 KiB or more go from the image to the socket with
  ``sendfile(2)``;
* page-cache modes (``disk.blocking`` false): a plain WRITE below 256 KiB is one ``disk.pwrite`` inline (a
  copy into the mapped image where its pages are cached, see :func:`map_image`); a
  larger one is spliced from the socket into the image (:mod:`cachemode.nbd.splice`), or, where it cannot
  be (FUA, no splice), goes to the pool so the kernel's copy overlaps the next receive;
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

Memory is bounded by budgets (:mod:`cachemode.nbd.budget`): each connection may make the server hold at most
its budget -- requests in flight and replies queued, together -- and all of them together the server's; a
request that does not fit waits, unexecuted, with reading paused, until replies leave or requests complete.
An idle connection owns no buffer (the receive scratch is shared), connections past ``max_connections`` are
closed before the greeting, and a client that does not negotiate within ``handshake_limit`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cachemode.nbd import budget
from cachemode.nbd.aio import BufferPool, open_aio
from cachemode.nbd.connection import HANDSHAKE_LIMIT, NBDConnection, Stats
from cachemode.nbd.direct import nowait_works
from cachemode.nbd.export import ExportInfo
from cachemode.nbd.handshake import TLSMode
from cachemode.nbd.pool import IOPool
from cachemode.nbd.requests import SCRATCH_SIZE
from cachemode.nbd.splice import splice_available
from cachemode.nbd.tls import TLSConfig
from cachemode.nbd.uring import open_uring
from cachemode.unixsock import listen_owner_only

log = logging.getLogger("cachemode.nbd")

MAX_CONNECTIONS = 256
"""Connections served at once by default; more are closed before the greeting (``serve --max-connections``)."""
SHUTDOWN_TIMEOUT = 30.0
"""Seconds a shutdown waits for connections to finish before dropping them (``serve --shutdown-timeout``)."""
TRIM_DELAY = 1.0
"""Seconds after a connection closes before freed memory is handed back to the system (at most once per delay)."""


class Server:
    """An NBD server for one export backed by a :class:`cachemode.disk.VirtualDisk`.

    The disk is handed in ready-made, so other parts (the power-loss lab) can serve their own stack. The
    server never closes a disk it was given; :func:`serve` opens and closes its own.

    Against clients that misbehave: ``max_connections`` served at once (more are closed before the
    greeting), ``handshake_limit`` seconds to negotiate, and the memory budgets of :mod:`cachemode.nbd.budget`
    -- ``connection_budget`` bytes per connection, ``server_budget`` for all of them together.
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
        max_connections: int = MAX_CONNECTIONS,
        connection_budget: int = budget.CONNECTION_BUDGET,
        server_budget: int = budget.SERVER_BUDGET,
        tls: TLSConfig | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.disk = disk
        self.handshake_limit = handshake_limit
        self.tls = tls
        self.tls_mode = tls.mode if tls is not None else TLSMode.OFF
        self.max_connections = max_connections
        self.export = ExportInfo.from_disk(disk, name=export_name, description=description)
        self.loop = loop or asyncio.get_event_loop()
        self._note_write: Callable[[], None] = lambda: None
        self.pool = IOPool(self.loop, workers or int(os.environ.get("CACHEMODE_NBD_WORKERS", "16")))
        self.stats = Stats()
        self.budget = budget.ServerBudget(self.loop, server_budget, connection_budget)
        # Where every connection receives what is not a WRITE payload: one buffer for all (see get_buffer).
        self.scratch = memoryview(bytearray(SCRATCH_SIZE))
        # Where the replies to small inline READs and WRITEs of one batch are built (NBDConnection._next_arena):
        # allocated on first use, replaced when a transport keeps part of it.
        self.reply_arena: memoryview | None = None
        self.shutting_down = False
        self._connections: set[NBDConnection] = set()
        self._refused_unlogged = 0
        self._refusal_logged = 0.0
        self._trim: asyncio.TimerHandle | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self.address: str = ""
        self.uri: str = ""
        # Reads may bypass the stack only for a buffered image with nothing emulated in between -- O_DSYNC
        # included: it makes writes durable and leaves reads page-cache reads. Writes may run inline only
        # when they cannot wait on the device (no O_DIRECT, no O_DSYNC, no per-write FUA).
        blocking = bool(getattr(disk, "blocking", True))
        self.fast_read_fd: int | None = getattr(disk, "fast_read_fd", None)
        self.inline_writes = not blocking and not disk.read_only
        # O_DIRECT with the plain stack: aligned reads and plain writes may use native AIO (see aio.py).
        self.aio: Any = None
        self.aio_fd = -1
        self.aio_align = 1
        # Payload buffers are pooled (and reused once a write completed) only with the plain stack: a lab
        # layer might keep a reference to the data it was handed.
        self.recycle = _plain_stack(disk)
        self.buffers = BufferPool()
        # Plain page-cache writes may be spliced from the socket into the image (see splice.py); they bypass
        # the mode layer, so they are reported to its write counter, as AIO writes are.
        self.splice_fd: int | None = None
        # An inline write is one pwrite on the image's fd with the plain stack (the stack would only pass it
        # down unchanged: no FUA, no O_DSYNC, nothing emulated), reported to the mode layer's write counter.
        self.write_inline: Callable[[Any, int], None] = disk.pwrite
        self.write_fd = -1  # the image's fd where an inline write may be a pwrite on it (the plain stack)
        # The image mapped, where inline writes to pages in the page cache are stored instead (see map_image).
        self.write_map: mmap.mmap | None = None
        if self.recycle and self.inline_writes:
            self._note_write = disk.top.note_write
            self.write_fd = disk.image.fd
            self.write_map = map_image(disk.image.fd, disk.image.size)
            if splice_available():
                self.splice_fd = disk.image.fd
        if getattr(getattr(disk, "mode", None), "direct", False) and self.recycle:
            self.aio = open_aio(self.loop, pool=self.buffers)
            # Writes done by AIO bypass the mode layer: they are reported to its write counter, so the next
            # FLUSH is not skipped as "nothing written since the last one".
            self._note_write = disk.top.note_write
            if self.aio is not None:
                self.aio_fd = disk.image.fd
                self.aio_align = max(disk.image.alignment, 512)
        self.read_inline: Callable[[int, int], bytes] | None = None
        if self.fast_read_fd is not None:
            self.read_inline = functools.partial(os.pread, self.fast_read_fd)
        elif not blocking:
            self.read_inline = disk.pread
        self.nowait_fd: int | None = self.fast_read_fd if nowait_works(self.fast_read_fd) else None
        # Reads that miss the page cache go to io_uring where the kernel offers it, else to the pool.
        self.uring: Any = open_uring(self.loop) if self.nowait_fd is not None else None

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

    def register(self, conn: NBDConnection) -> bool:
        """Count a new connection in; False when ``max_connections`` are served already (the caller closes it
        at once). Refusals are logged, at most one line a second however many there are."""
        if len(self._connections) < self.max_connections:
            self._connections.add(conn)
            return True
        self.stats.refused += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            log.warning(
                "%s: refused: %d connections already (--max-connections); %d refused since the last report",
                conn.peer,
                len(self._connections),
                self._refused_unlogged,
            )
            self._refusal_logged = now
            self._refused_unlogged = 0
        return False

    def connection_closed(self, conn: NBDConnection) -> None:
        """Forget ``conn``; a moment later, give memory freed by closed connections back to the system."""
        self._connections.discard(conn)
        if self._trim is None and not self.loop.is_closed():
            self._trim = self.loop.call_later(TRIM_DELAY, self._trim_memory)

    def _trim_memory(self) -> None:
        self._trim = None
        if not self._connections:
            self.buffers.close()  # nobody left to reuse them
        budget.trim()

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> int:
        """Listen on TCP; returns the bound port (useful with ``port=0``)."""
        srv = await self.loop.create_server(self._factory, host, port, reuse_address=True, backlog=128)
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()[1]
        hostpart = f"[{host}]" if ":" in host else host
        self.address = f"{host}:{bound}"
        self.uri = f"{self._scheme}://{hostpart}:{bound}/{self.export.name}"
        return int(bound)

    async def start_unix(self, path: str) -> str:
        """Listen on a Unix socket that only its owner may connect to (see :mod:`cachemode.unixsock`)."""
        srv = await self.loop.create_unix_server(self._factory, sock=listen_owner_only(path, 128), backlog=128)
        self._servers.append(srv)
        self.address = path
        self.uri = f"{self._scheme}+unix:///{self.export.name}?socket={path}"
        return path

    @property
    def _scheme(self) -> str:
        return "nbd" if self.tls is None else "nbds"

    def abort_connections(self) -> None:
        """Drop every connection now, without waiting for replies to be read (a second SIGTERM)."""
        for conn in list(self._connections):
            conn._abort()

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop accepting, finish in-flight requests, close connections, flush the disk (unless unsafe).

        Connections that have not closed after ``timeout`` seconds (a client that reads no replies keeps its
        connection open) are dropped.
        """
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
            left = [conn for conn in conns if not conn.closed]
            if left:
                log.warning("dropping %d connection(s) still open %s s after shutdown began", len(left), timeout)
            for conn in left:
                conn._abort()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        # The disk applies the mode: flush syncs in writeback/none, is a no-op in unsafe and O_DSYNC modes.
        if self.aio is not None:
            self.aio.close()
        if self.uring is not None:
            self.uring.close()
        if self.write_map is not None:
            with contextlib.suppress(BufferError):
                self.write_map.close()  # its pages stay in the page cache, dirty until flushed as any write's
        await self.pool.run(self.disk.flush)
        self.pool.shutdown()
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None

    @property
    def connections(self) -> int:
        return len(self._connections)


EXT4_SUPER_MAGIC = 0xEF53
"""ext2/3/4's statfs magic: where a small write into a large folio walks the folio's buffer heads (see
:func:`map_image`). Elsewhere the mapping is not made: on tmpfs, for one, pwrite and the mapping cost the same
here (2-3 us per 4 KiB write), and filesystems on iomap keep per-folio bitmaps instead of a walk."""


def filesystem_magic(fd: int) -> int | None:
    """The ``f_type`` of the filesystem ``fd`` lives on (statfs(2)), None where it cannot be told."""
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:4], sys.byteorder) if sys.byteorder == "little" else None


def map_image(fd: int, size: int) -> mmap.mmap | None:
    """The image, mapped shared and writable, for small inline writes (``_batch.write_batch``) and large ones
    over dirty pages (``_batch.splice_writes``); None where it cannot be mapped, is not on ext2/3/4
    (:data:`EXT4_SUPER_MAGIC`), or ``CACHEMODE_NBD_MAP=0``.

    Why: a small pwrite into a large page-cache folio costs the kernel a walk over all of the folio's blocks
    (about 18 us for 4 KiB on a file filled by 1 MiB writes, ext4 on Linux 6.18, against 1-2 us once its
    folios are 4 KiB ones), and the page cache holds large folios wherever sequential I/O filled it; stored
    through a mapping, the same write is a copy, the folio made writable once per time it is cleaned. Only
    pages already in the page cache are written that way (the others are pwritten, which needs no read of a
    whole block), under a SIGBUS guard, and the writes are the same page-cache writes, synced by the same
    fsync. The cost: a page fault at the first write to each page (where folios are small, that write costs
    a little more than a pwrite), those pages in the server's RSS, and page tables, at most 8 bytes per 4 KiB
    of the image written (0.2%).
    """
    if size <= 0 or os.environ.get("CACHEMODE_NBD_MAP", "1") == "0" or filesystem_magic(fd) != EXT4_SUPER_MAGIC:
        return None
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError):
        return None


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
    tls: TLSConfig | None = None,
    max_connections: int = MAX_CONNECTIONS,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    connection_budget: int = budget.CONNECTION_BUDGET,
    server_budget: int = budget.SERVER_BUDGET,
) -> Server:
    """Serve ``disk`` in the foreground until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly.

    ``on_ready`` is called once the socket listens (the command prints the URI there). The shutdown waits up
    to ``shutdown_timeout`` seconds for connections to finish; a second SIGINT/SIGTERM drops them at once.
    Returns the server, after shutdown, so the caller can read its stats. The disk is flushed but not closed.
    """
    import signal

    budget.tune_malloc()  # large buffers in their own mappings, returned to the system when freed
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(
        disk,
        export_name=export_name,
        description=description,
        loop=loop,
        max_connections=max_connections,
        connection_budget=connection_budget,
        server_budget=server_budget,
        tls=tls,
    )

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
                loop.add_signal_handler(sig, server.abort_connections)  # a second signal: stop waiting
            try:
                await server.shutdown(shutdown_timeout)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    return server
