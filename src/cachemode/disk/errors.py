"""Typed disk errors, each carrying the errno an NBD server answers with.

The NBD core maps these to wire errors without knowing which layer raised them: a range error on a read is
EINVAL, on a write ENOSPC (the server decides which by command), a write to a read-only disk EPERM, a fast
zero that would be slow ENOTSUP, anything from the operating system EIO.
"""

from __future__ import annotations

import errno

from cachemode.errors import CachemodeError


class DiskError(CachemodeError):
    """Base class: an operation on the virtual disk failed."""

    errno: int = errno.EIO


class DiskIOError(DiskError):
    """The host operating system failed an I/O call (EIO, ENOSPC on the host, ...)."""

    def __init__(self, message: str, os_errno: int | None = None) -> None:
        super().__init__(message)
        self.os_errno = os_errno


class RangeError(DiskError):
    """Offset or length out of range, or negative."""

    errno = errno.EINVAL


class ReadOnlyError(DiskError):
    """A write-type operation on a disk opened read-only."""

    errno = errno.EPERM


class FastZeroUnsupported(DiskError):
    """A write-zeroes with FAST_ZERO that could only be done by writing zeros (the disk is left unchanged)."""

    errno = errno.ENOTSUP


class ImageOpenError(DiskError):
    """The image could not be opened as asked: missing, unwritable, or O_DIRECT not supported there."""
