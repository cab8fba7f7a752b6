"""The one small interface every storage layer implements, and the pass-through base class.

The storage side is a stack, like QEMU's block nodes or nbdkit's filters::

    ModeLayer          cache-mode semantics: which flushes and FUAs reach the layers below
    [AlignmentLayer]   O_DIRECT only: read-modify-write of unaligned requests, serialised
    [lab layers]       optional emulated host page cache, emulated device write cache, write recorder
    ImageFile          the raw image or block device, opened with the mode's open(2) flags

A layer overrides what it changes and passes everything else to ``self.lower`` (nbdkit's ``next``), so a new
behaviour is a new layer, not a branch elsewhere. Every method may be called from several threads at once
(the NBD server uses a thread pool for O_DIRECT and O_DSYNC I/O); a layer with state must lock it.

Offsets and lengths are validated once, at the top of the stack (:class:`cachemode.disk.mode.ModeLayer`);
inner layers may assume requests are within the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

HOLE = 1
"""Extent flag: the range is unallocated (NBD ``base:allocation`` bit 0)."""
ZERO = 2
"""Extent flag: the range reads as zeros (NBD ``base:allocation`` bit 1)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk with the same allocation status; ``flags`` uses :data:`HOLE` and :data:`ZERO`."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Layer:
    """A node of the disk stack. The base class passes every call to ``lower`` unchanged."""

    def __init__(self, lower: Layer | None) -> None:
        self.lower = lower

    # -- properties asked of the stack ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        assert self.lower is not None
        return self.lower.size

    @property
    def read_only(self) -> bool:
        assert self.lower is not None
        return self.lower.read_only

    @property
    def alignment(self) -> int:
        """The request alignment the layer needs (1 when any offset and length work)."""
        assert self.lower is not None
        return self.lower.alignment

    @property
    def can_trim(self) -> bool:
        assert self.lower is not None
        return self.lower.can_trim

    @property
    def can_fast_zero(self) -> bool:
        """Whether write-zeroes can be done without writing zeros (so FAST_ZERO can succeed)."""
        assert self.lower is not None
        return self.lower.can_fast_zero

    # -- data path ------------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        assert self.lower is not None
        return self.lower.pread(length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; layers that can read in place override this to avoid a copy."""
        buf[:] = self.pread(len(buf), offset)

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` the data is durable before the call returns."""
        assert self.lower is not None
        self.lower.pwrite(data, offset, fua=fua)

    def flush(self) -> None:
        """Make every write completed before this call durable."""
        assert self.lower is not None
        self.lower.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range (advisory: it may read back as before or as zeros)."""
        assert self.lower is not None
        self.lower.trim(offset, length, fua=fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeros; ``may_trim`` allows a hole, ``fast`` forbids the slow fallback."""
        assert self.lower is not None
        self.lower.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch (NBD_CMD_CACHE)."""
        assert self.lower is not None
        self.lower.cache(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least ``[offset, offset+length)``, in order, none empty."""
        assert self.lower is not None
        return self.lower.block_status(offset, length)

    def close(self) -> None:
        assert self.lower is not None
        self.lower.close()

    # -- introspection --------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line naming this layer and its settings."""
        return type(self).__name__

    def stack(self) -> list[Layer]:
        """This layer and every layer below it, top first."""
        layers: list[Layer] = []
        node: Layer | None = self
        while node is not None:
            layers.append(node)
            node = node.lower
        return layers
