"""Linux native AIO (io_submit/io_getevents) for O_DIRECT I/O, completed through an eventfd in the event loop.

With O_DIRECT every request waits on the device. A thread pool pays several thread switches and GIL hand-offs
per request, which on a small machine costs more than the device itself; native AIO -- what QEMU calls
``aio=native`` -- submits from the event loop and reaps completions in batches, with no thread at all.

Only the plain data path uses it: aligned READs, and aligned WRITEs that need no durability of their own
(no FUA, write cache on) or whose durability the image's own O_DSYNC provides (directsync). Everything else
-- FUA elsewhere, FLUSH, unaligned requests (read-modify-write), TRIM, zeroes -- goes through the disk stack
on the thread pool, which keeps every durability decision in the stack.
Unavailable (no libc syscall, io_setup refused, another architecture): :func:`open_aio` returns None and the
server uses the pool for everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
from collections.abc import Callable
from typing import Any

from cachemode.nbd.syscalls import checked, syscall

_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_FLAG_RESFD = 1


class _Iocb(ctypes.Structure):
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_POOLED = 128 * 1024
_KEEP = 64
_KEEP_BYTES = 16 * 1024 * 1024
"""Free buffers kept for reuse, all sizes together (what stays mapped once the clients have gone)."""


class BufferPool:
    """Page-aligned buffers (anonymous mmaps) recycled by power-of-two size class.

    Fresh large buffers cost an mmap, page faults on first touch and an munmap; reusing them is what makes
    1 MiB requests cheap. Not thread-safe: used from the event loop thread only.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0  # bytes in the free lists

    def buffer(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``length`` bytes."""
        size = max(_POOLED, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._kept -= size
            return free.pop()
        return mmap.mmap(-1, size)

    def release(self, buf: mmap.mmap) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < _KEEP and self._kept + len(buf) <= _KEEP_BYTES:
            free.append(buf)
            self._kept += len(buf)
        else:
            with contextlib.suppress(BufferError):  # still viewed somewhere: the GC unmaps it later
                buf.close()

    def close(self) -> None:
        for free in self._free.values():
            for buf in free:
                with contextlib.suppress(BufferError):
                    buf.close()
        self._free.clear()
        self._kept = 0


class LinuxAIO:
    """One AIO context whose completions are delivered to ``loop`` via an eventfd."""

    def __init__(self, loop: Any, depth: int = 256, pool: BufferPool | None = None) -> None:
        numbers = _SYSCALLS[platform.machine()]
        self._syscall = syscall()
        self._nr = numbers
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        checked(
            self._syscall(ctypes.c_long(numbers["io_setup"]), ctypes.c_long(depth), ctypes.byref(self._ctx)), "io_setup"
        )
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events = (_Event * depth)()
        self._zero = _Timespec(0, 0)
        self._pending: dict[int, tuple[_Iocb, Any, int, Callable[[int, Any], None]]] = {}
        self._queued: list[tuple[int, _Iocb]] = []  # prepared, handed to the kernel by flush()
        self._next = 1
        self._own_pool = pool is None
        self.pool = pool or BufferPool()
        self.loop = loop
        loop.add_reader(self.efd, self._reap)
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- buffers ------------------------------------------------------------------------------------------------
    def buffer(self, length: int) -> mmap.mmap:
        return self.pool.buffer(length)

    def release(self, buf: mmap.mmap) -> None:
        self.pool.release(buf)

    # -- submission ----------------------------------------------------------------------------------------------
    def submit(
        self,
        opcode: int,
        fd: int,
        buf: mmap.mmap,
        length: int,
        offset: int,
        callback: Callable[[int, Any], None],
        rw_flags: int = 0,
        buf_offset: int = 0,
    ) -> bool:
        """Queue one read or write of ``length`` bytes between ``buf[buf_offset:]`` and ``fd``. ``callback(result,
        buf)`` gets the byte count or ``-errno`` (``-EAGAIN`` when :meth:`flush` could not hand it to the
        kernel). Returns False (nothing queued) when the context is full. Queued requests reach the kernel at
        the next :meth:`flush`: one io_submit for a batch, so the block layer plugs it and the device is told
        once, not once per request (on a VM each notification is an exit to the hypervisor)."""
        if self.closed or len(self._pending) >= self.depth:
            return False
        iocb = _Iocb()
        key = self._next
        self._next += 1
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + buf_offset
        iocb.aio_data = key
        iocb.aio_lio_opcode = opcode
        iocb.aio_fildes = fd
        iocb.aio_buf = address
        iocb.aio_nbytes = length
        iocb.aio_offset = offset
        iocb.aio_rw_flags = rw_flags
        iocb.aio_flags = IOCB_FLAG_RESFD
        iocb.aio_resfd = self.efd
        self._pending[key] = (iocb, buf, offset, callback)
        self._queued.append((key, iocb))
        return True

    def flush(self) -> None:
        """Hand every queued request to the kernel in one io_submit; any it refuses are called back with
        ``-EAGAIN``."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        n = len(queued)
        array = (ctypes.c_void_p * n)(*[ctypes.addressof(iocb) for _, iocb in queued])
        done = self._syscall(ctypes.c_long(self._nr["io_submit"]), self._ctx, ctypes.c_long(n), array)
        for key, _ in queued[max(done, 0) :]:
            entry = self._pending.pop(key, None)
            if entry is not None:
                entry[3](-errno.EAGAIN, entry[1])

    def _reap(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            return
        getevents = self._syscall
        nr = ctypes.c_long(self._nr["io_getevents"])
        events = self._events
        while self._pending:
            n = getevents(nr, self._ctx, ctypes.c_long(0), ctypes.c_long(self.depth), events, ctypes.byref(self._zero))
            if n <= 0:
                return
            for i in range(n):
                ev = events[i]
                entry = self._pending.pop(ev.data, None)
                if entry is None:
                    continue
                _, buf, _, callback = entry
                callback(ev.res, buf)
            if n < self.depth:
                return

    def close(self) -> None:
        """Stop reaping and destroy the context (the kernel waits for requests still in flight)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.efd)
        self._syscall(ctypes.c_long(self._nr["io_destroy"]), self._ctx)
        os.close(self.efd)
        if self._own_pool:
            self.pool.close()


def open_aio(loop: Any, depth: int = 256, pool: BufferPool | None = None) -> LinuxAIO | None:
    """A :class:`LinuxAIO` for ``loop``, or None where native AIO is not available."""
    if platform.machine() not in _SYSCALLS or os.environ.get("CACHEMODE_NBD_AIO", "1") == "0":
        return None
    try:
        return LinuxAIO(loop, depth, pool)
    except (OSError, AttributeError):
        return None
