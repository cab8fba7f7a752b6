"""The bottom of the stack: a raw image file or block device, opened with the cache mode's open(2) flags.

This layer is QEMU's ``block/file-posix.c`` reduced to what a raw image needs: pread/pwrite, fdatasync,
fallocate for discard and write-zeroes, SEEK_DATA/SEEK_HOLE for block status, and O_DIRECT alignment
probing. It does no alignment padding itself (that is :mod:`cachemode.disk.alignment`, one generic place,
as in ``block/io.c``): under O_DIRECT its callers hand it aligned offsets, lengths and buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from cachemode.disk.errors import DiskIOError, FastZeroUnsupported, ImageOpenError, ReadOnlyError
from cachemode.disk.layer import HOLE, ZERO, Extent, Layer
from cachemode.disk.locking import lock_image

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os module only offers posix_fallocate)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def flag_names(flags: int) -> list[str]:
    """The O_* names set in an fdinfo/fcntl flags word that matter for caching."""
    return [name for name in ("O_DIRECT", "O_DSYNC", "O_SYNC") if flags & getattr(os, name) == getattr(os, name)]


def fd_flags(fd: int, pid: int | str = "self") -> int:
    """The open flags of ``fd`` as the kernel reports them in ``/proc/PID/fdinfo`` (octal ``flags:`` line).

    fcntl(F_GETFL) would hide O_DSYNC/O_DIRECT on some kernels; fdinfo is what a test or an operator sees.
    """
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise DiskIOError(f"no flags line in /proc/{pid}/fdinfo/{fd}")


def aligned_buffer(length: int) -> mmap.mmap:
    """A zero-filled, page-aligned anonymous buffer, usable for O_DIRECT I/O."""
    return mmap.mmap(-1, max(length, 1))


class ImageFile(Layer):
    """A raw image file or block device; the layer with no ``lower``."""

    def __init__(
        self, path: str | os.PathLike[str], *, flags: int = 0, read_only: bool = False, locking: bool = True
    ) -> None:
        super().__init__(None)
        self.path = os.fspath(path)
        self._read_only = read_only
        self.direct = bool(flags & os.O_DIRECT)
        self.dsync = bool(flags & (os.O_DSYNC | os.O_SYNC))
        self.fd = self._open(flags)
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
                raise ImageOpenError(f"{self.path}: not a regular file or block device")
            self._size = self._probe_size(st)
            self._alignment = self._probe_alignment() if self.direct else 1
            if locking:
                lock_image(self.fd, self.path, writable=not read_only)
            if self._size % self._alignment:
                raise ImageOpenError(
                    f"{self.path}: image size {self._size} is not a multiple of the O_DIRECT request "
                    f"alignment {self._alignment}; use --cache writeback or resize the image"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self._punch_ok = True
        self._zero_range_ok = True
        self._rwf_dsync_ok = hasattr(os, "RWF_DSYNC")
        self._closed = False
        self._close_lock = threading.Lock()

    # -- opening and probing --------------------------------------------------------------------------------
    def _open(self, flags: int) -> int:
        access = os.O_RDONLY if self._read_only else os.O_RDWR
        try:
            return os.open(self.path, access | flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageOpenError(f"{self.path}: no such image (use --create SIZE to create it)") from None
        except IsADirectoryError:
            raise ImageOpenError(f"{self.path}: is a directory, not an image") from None
        except PermissionError:
            hint = "" if self._read_only else " (open it with --read-only?)"
            raise ImageOpenError(f"{self.path}: permission denied{hint}") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL and flags & os.O_DIRECT and self._opens_without_direct(access, flags):
                raise ImageOpenError(
                    f"{self.path}: filesystem does not support O_DIRECT "
                    "(cache modes 'none' and 'directsync' need it; use --cache writeback)"
                ) from None
            raise ImageOpenError(f"{self.path}: cannot open: {exc.strerror}") from None

    def _opens_without_direct(self, access: int, flags: int) -> bool:
        """Retry without O_DIRECT only to tell the user why it failed, as QEMU's qemu_open_internal does."""
        try:
            os.close(os.open(self.path, access | (flags & ~os.O_DIRECT) | os.O_CLOEXEC))
        except OSError:
            return False
        return True

    def _probe_size(self, st: os.stat_result) -> int:
        if not self.is_block_device:
            return st.st_size
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]

    def _probe_alignment(self) -> int:
        """The O_DIRECT request alignment, found as QEMU's ``raw_probe_alignment`` finds it.

        A block device reports its logical block size (BLKSSZGET). Otherwise trial reads of 1, 512, ..., 4096
        bytes at offset 0: the first that does not fail with EINVAL is the alignment. A 1-byte read that
        works proves nothing (the range may be a hole, or the file empty), so that case, like no answer at
        all, falls back to max(4096, page size), the safe choice.
        """
        safe = max(4096, mmap.PAGESIZE)
        if self.is_block_device:
            try:
                buf = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
                return struct.unpack("i", buf)[0]
            except OSError:
                pass
        probe = aligned_buffer(safe)
        try:
            with memoryview(probe) as view:
                for size in (1, 512, 1024, 2048, 4096):
                    try:
                        os.preadv(self.fd, [view[:size]], 0)
                    except OSError as exc:
                        if exc.errno == errno.EINVAL:
                            continue
                        raise ImageOpenError(f"{self.path}: O_DIRECT probe read failed: {exc.strerror}") from None
                    return safe if size == 1 else size
        finally:
            probe.close()
        return safe

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def can_trim(self) -> bool:
        return self._punch_ok and not self._read_only

    @property
    def can_fast_zero(self) -> bool:
        """Whether write-zeroes without holes is done by fallocate(ZERO_RANGE); learnt on first use."""
        return self._zero_range_ok and not self._read_only

    # -- data path ------------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        if self.direct:
            buf = aligned_buffer(length)
            try:
                with memoryview(buf) as view:
                    self.preadinto(view[:length], offset)
                return buf[:length]
            finally:
                buf.close()
        out = os.pread(self.fd, length, offset)
        if len(out) < length:
            # Only past the end of a file that shrank underneath us: read the rest as zeros, as a hole would.
            out += bytes(length - len(out))
        return out

    def preadinto(self, buf: memoryview, offset: int) -> None:
        done = 0
        total = len(buf)
        try:
            while done < total:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    buf[done:] = bytes(total - done)
                    return
                done += n
        except OSError as exc:
            raise DiskIOError(f"{self.path}: read at {offset + done}: {exc.strerror}", exc.errno) from None

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.path}: write to a read-only image")
        view = memoryview(data).cast("B")
        flags = 0
        if fua and not self.dsync and self._rwf_dsync_ok:
            flags = os.RWF_DSYNC
        done = 0
        try:
            while done < len(view):
                try:
                    done += os.pwritev(self.fd, [view[done:]], offset + done, flags)
                except OSError as exc:
                    if flags and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        # Old kernel or filesystem without RWF_DSYNC: write, then fdatasync below.
                        self._rwf_dsync_ok = False
                        flags = 0
                        continue
                    raise
            if fua and not self.dsync and not flags:
                os.fdatasync(self.fd)
        except OSError as exc:
            raise DiskIOError(f"{self.path}: write at {offset + done}: {exc.strerror}", exc.errno) from None

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise DiskIOError(f"{self.path}: fdatasync: {exc.strerror}", exc.errno) from None

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.path}: discard on a read-only image")
        if length == 0 or not self._punch_ok:
            return  # discard is advisory
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_ok = False
                return
            raise DiskIOError(f"{self.path}: punch hole: {exc.strerror}", exc.errno) from None
        if fua and not self.dsync:
            self.flush()

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.path}: write-zeroes on a read-only image")
        if length == 0:
            return
        if not self._zero_fast(offset, length, may_trim):
            if fast:
                raise FastZeroUnsupported(f"{self.path}: write-zeroes would have to write zeros")
            self._write_zeros(offset, length)
        if fua and not self.dsync:
            self.flush()

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> bool:
        """Zero with fallocate: punch a hole when allowed, else ZERO_RANGE; False if neither works here."""
        attempts = []
        if may_trim and self._punch_ok:
            attempts.append(("_punch_ok", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        if self._zero_range_ok:
            attempts.append(("_zero_range_ok", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        for attr, mode in attempts:
            try:
                fallocate(self.fd, mode, offset, length)
                return True
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    setattr(self, attr, False)
                    continue
                raise DiskIOError(f"{self.path}: fallocate: {exc.strerror}", exc.errno) from None
        return False

    def _write_zeros(self, offset: int, length: int) -> None:
        """The slow fallback: write real zeros through an aligned buffer (valid under O_DIRECT)."""
        zeros = aligned_buffer(min(length, _ZERO_CHUNK))
        try:
            view = memoryview(zeros)
            pos = offset
            while pos < offset + length:
                n = min(len(view), offset + length - pos)
                self.pwrite(view[:n], pos)
                pos += n
            view.release()
        finally:
            zeros.close()

    def cache(self, offset: int, length: int) -> None:
        if not self.direct:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Data and holes from SEEK_DATA/SEEK_HOLE; holes read as zeros. Block devices report all data."""
        end = min(offset + length, self._size)
        if self.is_block_device:
            return [Extent(offset, end - offset, 0)]
        extents: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    return [Extent(offset, end - offset, 0)]
                data = end
            if data > pos:
                hole_end = min(data, end)
                extents.append(Extent(pos, hole_end - pos, HOLE | ZERO))
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            data_end = min(max(hole, pos + 1), end)
            extents.append(Extent(pos, data_end - pos, 0))
            pos = data_end
        return extents

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def describe(self) -> str:
        flags = flag_names(fd_flags(self.fd)) if not self._closed else []
        return f"ImageFile {self.path} [{' '.join(['O_RDONLY' if self._read_only else 'O_RDWR', *flags])}]"
