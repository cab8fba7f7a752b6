"""The emulated host: volatile layers whose contents a power cut takes away.

Two layers emulate what sits between QEMU and the medium:

* :class:`EmulatedPageCache`, the host kernel's page cache. Buffered writes land here and are acknowledged;
  an fdatasync (our FLUSH) or O_DSYNC (FUA) pushes them down. Dirty data beyond ``capacity`` is written back,
  oldest first, as the kernel's dirty limits do.
* :class:`EmulatedDiskCache`, the storage device's volatile write cache. The "device" acknowledges a write
  once it is in this cache; FLUSH (SYNCHRONIZE CACHE / NVMe Flush) and FUA make data reach the medium, the
  image file. ``capacity=0`` is a device without a volatile cache: every write reaches the medium at once.

Both are :class:`VolatileCache`: a map from block number to the block's newest content, plus the id of the
write that put it there (so the lab can say which acknowledged writes are still only in volatile memory).
The image file below them is the *medium*: it holds exactly what the emulated world has made durable, so the
lab never needs a real fsync of it -- the disk-cache layer is where durability ends.

A :class:`MemoryDisk` (a bytearray) is the in-memory medium used by tests, the matrix and crash checks.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from cachemode.disk.layer import Extent, Layer

_tls = threading.local()


def current_write_id() -> int:
    """The id of the write the calling thread is performing (0 outside a lab write)."""
    return getattr(_tls, "wid", 0)


def set_write_id(wid: int) -> None:
    _tls.wid = wid


class MemoryDisk(Layer):
    """A disk held in a bytearray: the in-memory medium for tests and in-process crash checks."""

    def __init__(self, size_or_data: int | bytes | bytearray, *, read_only: bool = False) -> None:
        super().__init__(None)
        if isinstance(size_or_data, int):
            self.data = bytearray(size_or_data)
        else:
            self.data = bytearray(size_or_data)
        self._read_only = read_only
        self._lock = threading.Lock()
        self.writes = 0
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def alignment(self) -> int:
        return 1

    @property
    def can_trim(self) -> bool:
        return True

    @property
    def can_fast_zero(self) -> bool:
        return True

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            return bytes(self.data[offset : offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            self.data[offset : offset + len(view)] = view
            self.writes += 1

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        with self._lock:
            self.data[offset : offset + length] = bytes(length)
            self.writes += 1

    def cache(self, offset: int, length: int) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, 0)]

    def close(self) -> None:
        self.closed = True


class VolatileCache(Layer):
    """A write-back cache of dirty blocks over ``lower``, lost at a power cut.

    ``capacity`` bounds the dirty bytes held (beyond it the oldest dirty blocks are written back);
    ``writeback_after`` (seconds) lets :meth:`expire` write back blocks dirty for longer, like the kernel's
    ``dirty_expire_centisecs``. ``durable_below`` says whether ``lower`` is the medium: then FLUSH and FUA
    end here (the medium needs no sync), otherwise they are passed on.
    """

    name = "cache"

    def __init__(
        self,
        lower: Layer,
        capacity: int,
        *,
        block: int = 512,
        writeback_after: float | None = None,
        durable_below: bool = False,
    ) -> None:
        super().__init__(lower)
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.block = block
        self.writeback_after = writeback_after
        self.durable_below = durable_below
        self._zero = bytes(block)
        self._lock = threading.RLock()
        # block number -> (content, write id, time first dirtied); insertion order = oldest first
        self._dirty: OrderedDict[int, tuple[bytes, int, float]] = OrderedDict()
        self.written_back = 0  # bytes pushed to the layer below
        self.lost = 0  # bytes dropped at power cuts

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def dirty_bytes(self) -> int:
        with self._lock:
            return len(self._dirty) * self.block

    def dirty_write_ids(self) -> set[int]:
        with self._lock:
            return {wid for _, wid, _ in self._dirty.values()}

    def describe(self) -> str:
        return f"{type(self).__name__} capacity={self.capacity} block={self.block}"

    # -- helpers --------------------------------------------------------------------------------------------
    def _span(self, offset: int, length: int) -> range:
        return range(offset // self.block, (offset + length + self.block - 1) // self.block)

    def _read_block(self, b: int) -> bytes:
        entry = self._dirty.get(b)
        if entry is not None:
            return entry[0]
        start = b * self.block
        n = min(self.block, self.size - start)
        data = self.lower.pread(n, start)
        return data + bytes(self.block - n) if n < self.block else data

    def _put(self, entries: Iterable[tuple[int, bytes, int]]) -> None:
        """Store blocks as dirty (caller holds the lock), then enforce the capacity."""
        now = time.monotonic()
        for b, content, wid in entries:
            old = self._dirty.get(b)
            self._dirty[b] = (content, wid, old[2] if old else now)
        self._enforce_capacity()

    def _enforce_capacity(self) -> None:
        excess = len(self._dirty) - self.capacity // self.block
        if excess > 0:
            self._writeback(list(itertools.islice(self._dirty, excess)))

    def _writeback(self, blocks: Iterable[int]) -> None:
        """Push the given dirty blocks to ``lower`` (not durably, unless lower is the medium)."""
        items = []
        for b in sorted(blocks):
            entry = self._dirty.pop(b, None)
            if entry is not None:
                items.append((b, entry[0], entry[1]))
        if not items:
            return
        if isinstance(self.lower, VolatileCache):
            with self.lower._lock:
                self.lower._put(items)
        else:
            self._write_runs(items)
        self.written_back += len(items) * self.block

    def _write_runs(self, items: list[tuple[int, bytes, int]]) -> None:
        """Write sorted (block, content, wid) items to ``lower`` in contiguous runs; all-zero runs as zeroing."""
        run: list[bytes] = []
        run_start = prev = -2
        run_zero = False
        for b, content, _ in [*items, (-1, b"", 0)]:
            is_zero = content == self._zero
            if run and (b != prev + 1 or is_zero != run_zero):
                offset = run_start * self.block
                length = max(0, min(len(run) * self.block, self.size - offset))
                if length and run_zero:
                    self.lower.zero(offset, length, may_trim=False)
                elif length:
                    self.lower.pwrite(b"".join(run)[:length], offset)
                run = []
            if b < 0:
                break
            if not run:
                run_start, run_zero = b, is_zero
            run.append(content)
            prev = b

    # -- data path ------------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            span = self._span(offset, length)
            if not self._dirty or (len(span) > len(self._dirty) and not any(b in self._dirty for b in span)):
                return self.lower.pread(length, offset)
            hits = [b for b in span if b in self._dirty]
            if not hits:
                return self.lower.pread(length, offset)
            out = bytearray(self.lower.pread(length, offset))
            for b in hits:
                content = self._dirty[b][0]
                bstart = b * self.block
                lo = max(bstart, offset)
                hi = min(bstart + self.block, offset + length)
                out[lo - offset : hi - offset] = content[lo - bstart : hi - bstart]
            return bytes(out)

    def _blocks_for(self, data: bytes | memoryview | None, offset: int, length: int) -> list[tuple[int, bytes]]:
        """The new content of every block that a write (``data``) or a zeroing (``None``) touches."""
        view = memoryview(data).cast("B") if data is not None else None
        out = []
        for b in self._span(offset, length):
            bstart = b * self.block
            lo = max(bstart, offset)
            hi = min(bstart + self.block, offset + length)
            if lo == bstart and hi == bstart + self.block:
                content = bytes(view[lo - offset : hi - offset]) if view is not None else self._zero
            else:
                buf = bytearray(self._read_block(b))
                buf[lo - bstart : hi - bstart] = view[lo - offset : hi - offset] if view is not None else bytes(hi - lo)
                content = bytes(buf)
            out.append((b, content))
        return out

    def _store(self, data: bytes | memoryview | None, offset: int, length: int, fua: bool) -> None:
        wid = current_write_id()
        with self._lock:
            blocks = self._blocks_for(data, offset, length)
            if not fua:
                self._put((b, content, wid) for b, content in blocks)
                return
            # O_DSYNC / FUA: this write goes down now and durably; blocks it fully replaces are superseded.
            for b, _ in blocks:
                self._dirty.pop(b, None)
            items = [(b, content, wid) for b, content in blocks]
            if isinstance(self.lower, VolatileCache):
                self.lower._store_blocks(items, fua=True)
            else:
                self._write_runs(items)

    def _store_blocks(self, items: list[tuple[int, bytes, int]], *, fua: bool) -> None:
        with self._lock:
            if not fua:
                self._put(items)
                return
            for b, _, _ in items:
                self._dirty.pop(b, None)
            if isinstance(self.lower, VolatileCache):
                self.lower._store_blocks(items, fua=True)
            else:
                self._write_runs(items)

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        length = memoryview(data).nbytes
        if length:
            self._store(data, offset, length, fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # Discard is advisory; the emulated layers make the range read as zeros, like a thin device.
        if length:
            self._store(None, offset, length, fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        if length:
            self._store(None, offset, length, fua)

    def flush(self) -> None:
        with self._lock:
            self._writeback(list(self._dirty))
            if not self.durable_below:
                self.lower.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        with self._lock:
            if any(b in self._dirty for b in self._span(offset, length)):
                return [Extent(offset, length, 0)]
        return self.lower.block_status(offset, length)

    # -- the lab's controls ---------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Write back blocks dirty for longer than ``writeback_after``; returns the bytes written back."""
        if self.writeback_after is None:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [b for b, (_, _, t) in self._dirty.items() if now - t >= self.writeback_after]
            self._writeback(old)
            return len(old) * self.block

    def writeback_all(self) -> None:
        """Write every dirty block back (a clean host shutdown); no sync below."""
        with self._lock:
            self._writeback(list(self._dirty))

    def power_cut(self, rng: random.Random | None = None) -> tuple[int, int]:
        """Lose this layer's contents. With ``rng``, a random subset of dirty blocks reaches ``lower`` first.

        Returns (bytes that reached the layer below, bytes lost).
        """
        with self._lock:
            survivors = [b for b in self._dirty if rng is not None and rng.random() < 0.5]
            self._writeback(survivors)
            lost = len(self._dirty) * self.block
            self._dirty.clear()
            self.lost += lost
            return len(survivors) * self.block, lost

    def close(self) -> None:
        """A clean host shutdown: everything dirty is written back, then the layer below is closed."""
        self.writeback_all()
        self.lower.close()


class EmulatedPageCache(VolatileCache):
    """The host kernel's page cache (used by the modes without cache.direct)."""

    name = "page cache"


class EmulatedDiskCache(VolatileCache):
    """The storage device's volatile write cache; ``capacity=0`` is a device without one.

    ``honour_flush=False`` is a device that lies, as drives without power-loss protection have been caught
    doing: it acknowledges FLUSH and FUA without writing anything back, so what it holds stays volatile until
    its own capacity forces it out.
    """

    name = "disk cache"

    def __init__(self, lower: Layer, capacity: int, *, honour_flush: bool = True, **kwargs: object) -> None:
        super().__init__(lower, capacity, durable_below=True, **kwargs)  # type: ignore[arg-type]
        self.honour_flush = honour_flush

    def describe(self) -> str:
        return super().describe() + ("" if self.honour_flush else " (ignores FLUSH and FUA)")

    def _store(self, data: bytes | memoryview | None, offset: int, length: int, fua: bool) -> None:
        super()._store(data, offset, length, fua and self.honour_flush)

    def _store_blocks(self, items: list[tuple[int, bytes, int]], *, fua: bool) -> None:
        super()._store_blocks(items, fua=fua and self.honour_flush)

    def flush(self) -> None:
        if self.honour_flush:
            super().flush()
