"""The top of every disk stack: request validation and the cache mode's flush/FUA rules.

This is the one place where a cache mode changes what reaches storage, and every decision is read off the
mode table (:mod:`cachemode.modes`):

* ``unsafe`` (cache.no-flush): FLUSH and FUA are dropped here, never passed down, not even at close.
* ``writethrough``/``directsync``, and writeback/none with the guest's write cache switched off: every
  write-type request is passed down with FUA, so it is durable before it is acknowledged. Under a real image
  opened with O_DSYNC that FUA costs nothing more; under the lab's emulated layers it is what O_DSYNC means.
* A FLUSH reaches the layers below only when the mode's flushes sync (writeback, none), and, as in QEMU's
  ``bdrv_co_flush``, only if something was written since the last flush completed.
"""

from __future__ import annotations

import threading

from cachemode.disk.errors import RangeError, ReadOnlyError
from cachemode.disk.layer import Extent, Layer
from cachemode.modes import CacheMode


class ModeLayer(Layer):
    """Validates requests against the disk and applies the mode's FLUSH and FUA semantics."""

    def __init__(self, mode: CacheMode, lower: Layer, *, write_cache: bool = True) -> None:
        super().__init__(lower)
        self.mode = mode
        self.write_cache = write_cache
        self._gen_lock = threading.Lock()
        self._write_gen = 0
        self._flushed_gen = 0

    # -- validation -----------------------------------------------------------------------------------------
    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise RangeError(f"{what}: negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise RangeError(f"{what}: range {offset}+{length} is beyond the end of the disk ({self.size} bytes)")

    def _check_write(self, offset: int, length: int, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{what} on a read-only disk")
        self._check(offset, length, what)

    def _fua(self, fua: bool) -> bool:
        if self.mode.no_flush:
            return False
        return fua or self.mode.every_write_durable(self.write_cache)

    def note_write(self) -> None:
        """Count a completed write. A front end that writes around the stack (the NBD server's native AIO
        for plain O_DIRECT writes) calls this too, so the next FLUSH is not skipped as having nothing to do."""
        with self._gen_lock:
            self._write_gen += 1

    # -- data path ------------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        self._check(offset, length, "read")
        return self.lower.pread(length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf), "read")
        self.lower.preadinto(buf, offset)

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        length = memoryview(data).nbytes
        self._check_write(offset, length, "write")
        if length:
            self.lower.pwrite(data, offset, fua=self._fua(fua))
            self.note_write()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length, "trim")
        if length:
            self.lower.trim(offset, length, fua=self._fua(fua))
            self.note_write()

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        self._check_write(offset, length, "write-zeroes")
        if length:
            self.lower.zero(offset, length, may_trim=may_trim, fua=self._fua(fua), fast=fast)
            self.note_write()

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length, "cache")
        self.lower.cache(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length, "block status")
        return self.lower.block_status(offset, length)

    def flush(self) -> None:
        """Make completed writes durable, as the mode defines it (a no-op in unsafe and O_DSYNC modes)."""
        if not self.mode.flush_syncs(self.write_cache) or self.read_only:
            return
        with self._gen_lock:
            gen = self._write_gen
            if gen == self._flushed_gen:
                return
        self.lower.flush()
        with self._gen_lock:
            self._flushed_gen = max(self._flushed_gen, gen)

    def close(self) -> None:
        """A clean close flushes, except in unsafe, which never syncs (QEMU's bdrv_close does the same)."""
        try:
            self.flush()
        finally:
            self.lower.close()

    def describe(self) -> str:
        wc = "on" if self.write_cache else "off"
        return (
            f"ModeLayer cache={self.mode.name} [writeback={self.mode.writeback} direct={self.mode.direct} "
            f"no-flush={self.mode.no_flush} write-cache={wc}]"
        )
