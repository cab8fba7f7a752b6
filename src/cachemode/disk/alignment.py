"""O_DIRECT alignment: serve any offset and length over an image that needs aligned I/O.

The generic rules live here once, as in QEMU's ``block/io.c`` (``bdrv_pad_request``): a request is padded
out to the request alignment, the partial head and tail blocks are read, the caller's bytes are merged in an
aligned bounce buffer, and the padded block range is written. Overlapping write-type requests are serialised
on their *padded* ranges, so two unaligned writes that share a block can never undo each other's bytes.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cachemode.disk.image import aligned_buffer
from cachemode.disk.layer import Layer

_POOLED = 1 << 20
"""Bounce buffers up to this size are kept per thread and reused; larger ones are mapped per request."""


class RangeLock:
    """Mutual exclusion between overlapping byte ranges; disjoint ranges proceed in parallel."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append((start, end))
        try:
            yield
        finally:
            with self._cond:
                self._held.remove((start, end))
                self._cond.notify_all()


class AlignmentLayer(Layer):
    """Pads unaligned requests for a lower layer that needs ``lower.alignment``-aligned I/O."""

    def __init__(self, lower: Layer) -> None:
        super().__init__(lower)
        self.block = lower.alignment
        self._locks = RangeLock()
        self._local = threading.local()

    @property
    def alignment(self) -> int:
        return 1

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self.block
        end = -(-(offset + length) // self.block) * self.block
        return start, end

    @contextmanager
    def _bounce(self, length: int) -> Iterator[memoryview]:
        """An aligned buffer of at least ``length`` bytes: this thread's pooled one, or a fresh mapping."""
        pooled = length <= _POOLED
        if pooled:
            buf = getattr(self._local, "buf", None)
            if buf is None:
                buf = self._local.buf = aligned_buffer(_POOLED)
        else:
            buf = aligned_buffer(length)
        view = memoryview(buf)[:length]
        try:
            yield view
        finally:
            view.release()  # so that the mapping can be closed even if the caller still names the view
            if not pooled:
                buf.close()

    # -- reads ----------------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        self.preadinto(memoryview(out), offset)
        return bytes(out)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        start, end = self._span(offset, len(buf))
        with self._bounce(end - start) as bounce:
            self.lower.preadinto(bounce, start)
            buf[:] = bounce[offset - start : offset - start + len(buf)]

    # -- writes ---------------------------------------------------------------------------------------------
    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        length = len(memoryview(data).cast("B"))
        start, end = self._span(offset, length)
        with self._locks.hold(start, end):
            self._rmw(data, offset, start, end, fua)

    def _rmw(self, data: bytes | memoryview, offset: int, start: int, end: int, fua: bool) -> None:
        """Read the partial head and tail blocks, merge ``data``, write the padded range. Caller holds the lock."""
        src = memoryview(data).cast("B")
        with self._bounce(end - start) as bounce:
            if offset > start:
                self.lower.preadinto(bounce[: self.block], start)
            tail = end - self.block
            if offset + len(src) < end and (tail >= start + self.block or offset == start):
                self.lower.preadinto(bounce[tail - start :], tail)
            bounce[offset - start : offset - start + len(src)] = src
            self.lower.pwrite(bounce, start, fua=fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Zero the aligned middle below; write zeros into the partial head and tail blocks here."""
        if length == 0:
            return
        start, end = self._span(offset, length)
        mid_start = start if offset == start else start + self.block
        mid_end = end if offset + length == end else end - self.block
        with self._locks.hold(start, end):
            if mid_end <= mid_start:
                self._rmw(bytes(length), offset, start, end, fua)
                return
            if offset < mid_start:
                self._rmw(bytes(mid_start - offset), offset, start, mid_start, fua)
            self.lower.zero(mid_start, mid_end - mid_start, may_trim=may_trim, fua=fua, fast=fast)
            if offset + length > mid_end:
                self._rmw(bytes(offset + length - mid_end), mid_end, mid_end, end, fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard is advisory: round inward to whole blocks, as the NBD spec allows."""
        start = -(-offset // self.block) * self.block
        end = (offset + length) // self.block * self.block
        if end > start:
            with self._locks.hold(start, end):
                self.lower.trim(start, end - start, fua=fua)

    def describe(self) -> str:
        return f"AlignmentLayer [request alignment {self.block}, page {mmap.PAGESIZE}]"
