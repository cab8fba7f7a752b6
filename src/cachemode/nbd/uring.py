"""io_uring for buffered READs that miss the page cache, completed through an eventfd in the event loop.

A READ whose pages are not cached (the ``preadv(RWF_NOWAIT)`` probe failed) used to go to the thread pool:
on a small machine the thread switches and GIL hand-offs cost several times the read itself. io_uring reads
a buffered file asynchronously with no thread of ours (the kernel starts the readahead and completes the read
when the pages arrive; where a filesystem cannot, it uses its own workers), and completions are reaped in
batches from the loop, as native AIO's are for O_DIRECT (:mod:`cachemode.nbd.aio`).

Only reads: nothing about durability goes through here. x86-64 only (the rings are shared memory written
from Python; x86's store order is what makes that safe without explicit barriers). Unavailable (another
architecture, io_uring disabled or refused, ``CACHEMODE_NBD_URING=0``): :func:`open_uring` returns None and
misses go to the pool as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

from cachemode.nbd.syscalls import checked, syscall

_SETUP, _ENTER, _REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_REGISTER_EVENTFD = 4
_GETEVENTS = 1
OP_READ = 22
_SQE_SIZE = 64
_CQE = struct.Struct("<QiI")
_SQE_HEAD = struct.Struct("<BBHiQQIIQ")  # opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data
_SQE_TAIL_ZEROS = bytes(_SQE_SIZE - _SQE_HEAD.size)


class _SqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "flags")] + [
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "overflow")] + [
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


Callback = Callable[[int], None]
"""``callback(result)``: bytes read, or ``-errno``."""


class Uring:
    """One io_uring whose completions are delivered to ``loop`` via an eventfd. Loop thread only."""

    def __init__(self, loop: Any, entries: int = 256) -> None:
        self._syscall = syscall()
        params = _Params()
        fd = checked(
            self._syscall(ctypes.c_long(_SETUP), ctypes.c_uint(entries), ctypes.byref(params)), "io_uring_setup"
        )
        self.fd = int(fd)
        self._maps: list[mmap.mmap] = []
        self.efd = -1
        try:
            self._map(params)
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self.efd)
            registered = self._syscall(ctypes.c_long(_REGISTER), self.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1)
            checked(registered, "io_uring_register")
        except BaseException:
            self._release()
            raise
        self.depth = params.sq_entries
        self._pending: dict[int, tuple[Any, Callback]] = {}
        self._next = 1
        self._unsubmitted = 0
        self.loop = loop
        loop.add_reader(self.efd, self._reap)
        self.closed = False

    def _map(self, p: _Params) -> None:
        sq_size = p.sq_off.array + p.sq_entries * 4
        cq_size = p.cq_off.cqes + p.cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if p.features & _FEAT_SINGLE_MMAP:
            sq = cq = mmap.mmap(self.fd, max(sq_size, cq_size), mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
            self._maps.append(sq)
        else:
            sq = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
            cq = mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot, offset=_OFF_CQ_RING)
            self._maps += [sq, cq]
        self._sqes = mmap.mmap(self.fd, p.sq_entries * _SQE_SIZE, mmap.MAP_SHARED, prot, offset=_OFF_SQES)
        self._maps.append(self._sqes)
        u32 = ctypes.c_uint32
        self._sq_tail = u32.from_buffer(sq, p.sq_off.tail)
        self._sq_mask = u32.from_buffer(sq, p.sq_off.ring_mask).value
        self._sq_array = p.sq_off.array
        self._sq = sq
        self._cq_head = u32.from_buffer(cq, p.cq_off.head)
        self._cq_tail = u32.from_buffer(cq, p.cq_off.tail)
        self._cq_mask = u32.from_buffer(cq, p.cq_off.ring_mask).value
        self._cqes = p.cq_off.cqes
        self._cq = cq

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def read(self, fd: int, buf: bytearray, start: int, length: int, offset: int, callback: Callback) -> bool:
        """Queue a read of ``length`` bytes at ``offset`` into ``buf[start:]``; False when the ring is full.
        Queued reads go to the kernel at the next :meth:`submit` (one system call for a batch)."""
        if self.closed or len(self._pending) + 1 > self.depth:
            return False
        key = self._next
        self._next += 1
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)  # pins buf: it cannot be resized meanwhile
        tail = self._sq_tail.value
        index = tail & self._sq_mask
        at = index * _SQE_SIZE
        _SQE_HEAD.pack_into(self._sqes, at, OP_READ, 0, 0, fd, offset, ctypes.addressof(holder) + start, length, 0, key)
        self._sqes[at + _SQE_HEAD.size : at + _SQE_SIZE] = _SQE_TAIL_ZEROS
        struct.pack_into("<I", self._sq, self._sq_array + index * 4, index)
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF  # after the entry is written: the kernel reads it then
        self._pending[key] = (holder, callback)
        self._unsubmitted += 1
        return True

    def submit(self) -> None:
        """Hand every queued read to the kernel."""
        if not self._unsubmitted:
            return
        n = self._unsubmitted
        done = self._syscall(ctypes.c_long(_ENTER), self.fd, ctypes.c_uint(n), 0, 0, None, 0)
        # Entries the kernel did not take stay in the ring; the next submit (or reap) hands them over.
        self._unsubmitted = n - done if done >= 0 else n

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.efd)
        head = self._cq_head.value
        tail = self._cq_tail.value
        cq, base, mask, pending = self._cq, self._cqes, self._cq_mask, self._pending
        while head != tail:
            key, res, _flags = _CQE.unpack_from(cq, base + (head & mask) * _CQE.size)
            head = (head + 1) & 0xFFFFFFFF
            self._cq_head.value = head
            entry = pending.pop(key, None)
            if entry is not None:
                entry[1](res)
            if head == tail:
                tail = self._cq_tail.value
        if self._unsubmitted:
            self.submit()

    def close(self) -> None:
        """Stop reaping and close the ring (the kernel cancels or finishes what is in flight)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.efd)
        if self._pending:
            # Wait for reads in flight: their buffers must outlive the kernel's writes into them.
            self._syscall(ctypes.c_long(_ENTER), self.fd, 0, ctypes.c_uint(len(self._pending)), _GETEVENTS, None, 0)
        self._pending.clear()
        self._release()

    def _release(self) -> None:
        for name in ("_sq_tail", "_cq_head", "_cq_tail"):
            if hasattr(self, name):
                delattr(self, name)  # the ctypes views pin the mmaps
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        for fd in (self.fd, self.efd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def open_uring(loop: Any, entries: int = 256) -> Uring | None:
    """A :class:`Uring` for ``loop``, or None where io_uring is not available here."""
    if platform.machine() != "x86_64" or os.environ.get("CACHEMODE_NBD_URING", "1") == "0":
        return None
    try:
        return Uring(loop, entries)
    except (OSError, AttributeError, ValueError):
        return None
