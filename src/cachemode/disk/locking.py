"""Image locking that interoperates with QEMU's (``block/file-posix.c``, ``raw_apply_lock_bytes``).

QEMU protects an image from a second writer with open-file-description (OFD) byte-range locks: a process
holding permission *i* takes a shared lock on byte ``100 + i``, and one that refuses to share permission *i*
takes a shared lock on byte ``200 + i``. Before taking them it tests for the other side's locks. cachemode
does the same with the same bytes, so ``qemu-nbd``, ``qemu-img`` or a QEMU guest and ``cachemode serve``
refuse each other's images exactly as two QEMU processes would ("Failed to get "write" lock").

A writer holds CONSISTENT_READ and WRITE and does not share WRITE; a read-only user holds CONSISTENT_READ and
does not share WRITE either, so nobody changes the data under it (QEMU's default for ``qemu-img info``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from cachemode.disk.errors import ImageOpenError

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ = 0
WRITE = 1
_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write"}
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid


def _lock(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))


def _held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte`` (ours never conflict with us)."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def lock_image(fd: int, path: str, *, writable: bool) -> None:
    """Take QEMU-compatible locks on ``fd``, or raise :class:`ImageOpenError` naming the conflict.

    Filesystems without OFD locks (some network and FUSE filesystems) are used unlocked, as QEMU's
    ``locking=auto`` does. The locks go with the descriptor: closing it releases them.
    """
    held = [CONSISTENT_READ, WRITE] if writable else [CONSISTENT_READ]
    unshared = [WRITE]
    try:
        # Lock first, then look for conflicts (as QEMU does): two processes opening at once both see each other.
        for perm in held:
            _lock(fd, PERM_BASE + perm)
        for perm in unshared:
            _lock(fd, SHARED_BASE + perm)
        for perm in held:  # someone refuses to share what we need
            if _held_by_other(fd, SHARED_BASE + perm):
                raise ImageOpenError(
                    f'{path}: failed to get "{_NAMES[perm]}" lock: another process (QEMU, qemu-nbd or cachemode) '
                    "is using the image and does not share it"
                )
        for perm in unshared:  # someone has what we refuse to share
            if _held_by_other(fd, PERM_BASE + perm):
                raise ImageOpenError(
                    f'{path}: failed to get shared "{_NAMES[perm]}" lock: another process (QEMU, qemu-nbd or '
                    "cachemode) is writing to the image"
                )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOLCK, errno.EINVAL):
            return
        raise ImageOpenError(f"{path}: cannot lock the image: {exc.strerror}") from None
