"""The virtual disk: a stack of layers over a raw image, with QEMU's exact cache-mode semantics."""

from cachemode.disk.errors import (
    DiskError,
    DiskIOError,
    FastZeroUnsupported,
    ImageOpenError,
    RangeError,
    ReadOnlyError,
)
from cachemode.disk.image import ImageFile
from cachemode.disk.layer import HOLE, ZERO, Extent, Layer
from cachemode.disk.mode import ModeLayer
from cachemode.disk.virtual import VirtualDisk, create_image, open_disk

__all__ = [
    "HOLE",
    "ZERO",
    "DiskError",
    "DiskIOError",
    "Extent",
    "FastZeroUnsupported",
    "ImageFile",
    "ImageOpenError",
    "Layer",
    "ModeLayer",
    "RangeError",
    "ReadOnlyError",
    "VirtualDisk",
    "create_image",
    "open_disk",
]
