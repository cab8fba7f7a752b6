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
* page-cache modes (``disk.blocking`` false): a plain WRITE below 256 KiB is one ``disk.pwrite`` inline; a
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

Memory per connection is bounded: the parser holds at most one request plus one WRITE payload (32 MiB), and
reading pauses while more than :data:`MAX_IN_FLIGHT` requests or :data:`MAX_IN_FLIGHT_BYTES` of payload are
outstanding, or while more than :data:`WRITE_HIGH_WATER` of replies wait for a client that does not read;
requests already parsed when that happens wait in a backlog, unexecuted, until the congestion clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

from cachemode.nbd.aio import BufferPool, open_aio
from cachemode.nbd.connection import HANDSHAKE_LIMIT, NBDConnection, Stats
from cachemode.nbd.direct import nowait_works, pwrite_all
from cachemode.nbd.export import ExportInfo
from cachemode.nbd.pool import IOPool
from cachemode.nbd.splice import splice_available
from cachemode.nbd.uring import open_uring


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
        if self.recycle and self.inline_writes:
            self._note_write = disk.top.note_write
            self.write_inline = functools.partial(pwrite_all, disk.image.fd, disk.top.note_write)
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
        if self.uring is not None:
            self.uring.close()
        await self.pool.run(self.disk.flush)
        self.pool.shutdown()

    @property
    def connections(self) -> int:
        return len(self._connections)


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
