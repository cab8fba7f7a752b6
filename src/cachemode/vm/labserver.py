"""The disk served over NBD on a loopback port, in this process: for a crash run, the stack ``serve --lab`` serves.

In-process rather than a subprocess so the run can read the lab's counters and cut its power at the exact
moment it chooses, with no control socket in between; the NBD server runs on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachemode.lab.disk import LabConfig, LabDisk, open_lab_disk
from cachemode.nbd.server import Server, new_event_loop


class ThreadedServer:
    """An NBD :class:`Server` for ``disk`` on 127.0.0.1:<ephemeral port>, its event loop in a daemon thread."""

    def __init__(
        self, disk: Any, export: str = "", description: str = "", handshake_limit: float | None = None
    ) -> None:
        self.loop = new_event_loop()
        limit = {} if handshake_limit is None else {"handshake_limit": handshake_limit}
        try:
            self.server = Server(disk, export_name=export, loop=self.loop, description=description, **limit)
            self.port: int = self.loop.run_until_complete(self.server.start_tcp("127.0.0.1", 0))
        except BaseException:
            self.loop.close()
            raise
        self.thread = threading.Thread(target=self.loop.run_forever, name="vm-nbd-server", daemon=True)
        self.thread.start()
        self._stopped = False

    @property
    def stats(self) -> Any:
        """The server's request counters (flushes, requests, ...)."""
        return self.server.stats

    def stop(self) -> None:
        """Shut the server down (it flushes the disk as the mode says; it never closes it)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout=10), self.loop)
            fut.result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@contextlib.contextmanager
def serve_disk(disk: Any, export: str = "", handshake_limit: float | None = None) -> Iterator[ThreadedServer]:
    """Serve an open disk for the duration of the block."""
    srv = ThreadedServer(disk, export, handshake_limit=handshake_limit)
    try:
        yield srv
    finally:
        srv.stop()


class LabServer(ThreadedServer):
    """``open_lab_disk`` served over NBD: the lab's counters and power cut are at hand as ``disk``."""

    def __init__(self, image: Path, mode: str, config: LabConfig, *, write_cache: bool = True) -> None:
        self.disk: LabDisk = open_lab_disk(image, mode, config, write_cache=write_cache)
        try:
            super().__init__(self.disk, description=f"cachemode lab {mode} export of {image}")
        except BaseException:
            self.disk.close()
            raise

    def stop(self) -> None:
        """Shut the server down, then close the disk (after a power cut nothing volatile is left to write)."""
        try:
            super().stop()
        finally:
            self.disk.close()

    def __enter__(self) -> LabServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
