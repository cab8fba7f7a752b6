"""A virtual disk: a cache mode, the guest's write-cache switch, and the layer stack that implements them.

:func:`open_disk` builds the stack the study note draws -- mode semantics, alignment padding where O_DIRECT
needs it, the image file opened with the mode's flags -- and :class:`VirtualDisk` is the handle a server or a
test holds. It speaks the same small interface as a layer (it forwards to the top of the stack) and adds
what a front end asks about: the mode, what to advertise to the guest, whether I/O waits on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cachemode.disk.alignment import AlignmentLayer
from cachemode.disk.errors import ImageOpenError
from cachemode.disk.image import ImageFile
from cachemode.disk.layer import Extent, Layer
from cachemode.disk.mode import ModeLayer
from cachemode.modes import CacheMode, get_mode


class VirtualDisk:
    """The handle on a stack whose top is a :class:`ModeLayer` and whose bottom is an :class:`ImageFile`."""

    def __init__(self, top: ModeLayer, image: ImageFile, *, entry: Layer | None = None) -> None:
        """``entry`` is where requests enter, when layers sit above the mode layer (the lab's recorder)."""
        self.top = top
        self.image = image
        self.mode: CacheMode = top.mode
        self.entry = entry = entry or top
        # Bound methods of the entry layer, looked up once: the NBD server calls these on its hot path.
        self.pread = entry.pread
        self.preadinto = entry.preadinto
        self.pwrite = entry.pwrite
        self.flush = entry.flush
        self.trim = entry.trim
        self.zero = entry.zero
        self.cache = entry.cache

    # -- the guest's write-cache switch ---------------------------------------------------------------------
    @property
    def write_cache(self) -> bool:
        """The guest-visible write cache (QEMU ``write-cache=on|off``; virtio WCE). Switchable at run time."""
        return self.top.write_cache

    @write_cache.setter
    def write_cache(self, enabled: bool) -> None:
        self.top.write_cache = enabled

    @property
    def guest_write_cache(self) -> bool:
        """Whether the guest is told of a volatile write cache: advertise SEND_FLUSH and SEND_FUA."""
        return self.mode.guest_write_cache(self.write_cache)

    # -- properties of the stack ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.top.size

    @property
    def read_only(self) -> bool:
        return self.top.read_only

    @property
    def alignment(self) -> int:
        """The image's O_DIRECT request alignment (1 when buffered); the disk itself accepts any alignment."""
        return self.image.alignment

    @property
    def can_trim(self) -> bool:
        return self.top.can_trim

    @property
    def can_fast_zero(self) -> bool:
        return self.top.can_fast_zero

    @property
    def blocking(self) -> bool:
        """True when I/O waits on the device (O_DIRECT, O_DSYNC or per-write FUA): serve it from threads."""
        return self.mode.direct or self.mode.every_write_durable(self.write_cache)

    @property
    def fast_read_fd(self) -> int | None:
        """The image's fd when a read may go straight to it (page-cache reads, nothing emulated in between)."""
        if self.mode.direct or self.top.lower is not self.image:
            return None
        return self.image.fd

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.entry.block_status(offset, length)

    def layers(self) -> list[Layer]:
        return self.entry.stack()

    def describe(self) -> list[str]:
        """One line per layer, top first: the note's picture, as the code has it."""
        return [layer.describe() for layer in self.layers()]

    def close(self) -> None:
        self.top.close()

    def __enter__(self) -> VirtualDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_image(path: str | os.PathLike[str], size: int) -> None:
    """Create a sparse raw image of ``size`` bytes; an existing image must already have that size."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        existing = os.stat(path).st_size
        if existing != size:
            raise ImageOpenError(f"{path}: exists with size {existing}, not the requested {size}") from None
        return
    except OSError as exc:
        raise ImageOpenError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def open_disk(
    path: str | os.PathLike[str],
    mode: str | CacheMode | None = None,
    *,
    write_cache: bool = True,
    read_only: bool = False,
    create_size: int | None = None,
    middle: Callable[[CacheMode, Layer], Layer] | None = None,
    locking: bool = True,
) -> VirtualDisk:
    """Open ``path`` as a virtual disk in cache ``mode`` (default writeback).

    ``middle`` lets another part (the power-loss lab) put layers between the mode layer and the image: it
    receives the mode and the image layer and returns the layer the mode layer sits on. The image is then
    opened without the mode's flags, since those layers emulate them. ``locking`` takes QEMU-compatible
    image locks (:mod:`cachemode.disk.locking`); turn it off only for an image nobody else can be using.
    """
    cache_mode = get_mode(mode)
    if create_size is not None:
        create_image(path, create_size)
    flags = 0 if middle is not None else cache_mode.os_flags
    image = ImageFile(path, flags=flags, read_only=read_only, locking=locking)
    try:
        below: Layer = image
        if middle is not None:
            below = middle(cache_mode, image)
        elif image.alignment > 1:
            below = AlignmentLayer(image)
        top = ModeLayer(cache_mode, below, write_cache=write_cache)
    except BaseException:
        image.close()
        raise
    return VirtualDisk(top, image)
