"""The emulated volatile layers on their own: read-your-writes, FUA, FLUSH, capacity, power cuts."""

from __future__ import annotations

import random
import threading
import time

from cachemode.lab.layers import EmulatedDiskCache, EmulatedPageCache, MemoryDisk


def stack(host: int = 1 << 20, disk: int = 1 << 20):
    medium = MemoryDisk(64 * 1024)
    dc = EmulatedDiskCache(medium, disk)
    pc = EmulatedPageCache(dc, host)
    return medium, dc, pc


def test_unaligned_writes_read_back_and_stay_volatile():
    medium, dc, pc = stack()
    medium.data[0:2048] = b"o" * 2048
    pc.pwrite(b"x" * 700, 300)
    assert pc.pread(1200, 0) == b"o" * 300 + b"x" * 700 + b"o" * 200
    assert medium.data[0:2048] == b"o" * 2048  # nothing reached the medium
    assert pc.dirty_bytes == 1024 and dc.dirty_bytes == 0


def test_flush_drains_both_layers_to_the_medium():
    medium, dc, pc = stack()
    pc.pwrite(b"a" * 5000, 100)
    pc.flush()
    assert pc.dirty_bytes == 0 and dc.dirty_bytes == 0
    assert medium.data[100:5100] == b"a" * 5000


def test_fua_makes_only_that_write_durable():
    medium, dc, pc = stack()
    pc.pwrite(b"p" * 512, 0)
    pc.pwrite(b"f" * 512, 4096, fua=True)
    assert medium.data[4096:4608] == b"f" * 512
    assert medium.data[0:512] == bytes(512)
    pc.power_cut()
    dc.power_cut()
    assert medium.data[0:512] == bytes(512)


def test_fua_partial_block_keeps_the_rest_of_a_dirty_block():
    _medium, _dc, pc = stack()
    pc.pwrite(b"1" * 512, 0)
    pc.pwrite(b"2" * 100, 50, fua=True)
    assert pc.pread(512, 0) == b"1" * 50 + b"2" * 100 + b"1" * 362


def test_capacity_writes_back_oldest_first():
    medium, _dc, pc = stack(host=1024, disk=0)
    for i in range(4):
        pc.pwrite(bytes([65 + i]) * 512, i * 512)
    assert pc.dirty_bytes == 1024
    assert medium.data[0:1024] == b"A" * 512 + b"B" * 512  # the two oldest were written back
    assert medium.data[1024:2048] == bytes(1024)


def test_zero_and_trim_read_as_zeros_until_lost():
    medium, _dc, pc = stack()
    medium.data[0:4096] = b"z" * 4096
    pc.zero(512, 1024)
    pc.trim(2048, 512)
    assert pc.pread(4096, 0) == b"z" * 512 + bytes(1024) + b"z" * 512 + bytes(512) + b"z" * 1536
    pc.power_cut()
    assert pc.pread(4096, 0) == b"z" * 4096


def test_random_power_cut_keeps_a_reproducible_subset():
    def run(seed: int) -> bytes:
        medium, dc, pc = stack()
        for i in range(64):
            pc.pwrite(bytes([i + 1]) * 512, i * 512)
        rng = random.Random(seed)
        pc.power_cut(rng)
        dc.power_cut(rng)
        return bytes(medium.data[: 64 * 512])

    a, b = run(3), run(3)
    assert a == b
    kept = sum(1 for i in range(64) if a[i * 512] == i + 1)
    assert 0 < kept < 64


def test_expire_writes_back_old_blocks():
    medium = MemoryDisk(8192)
    dc = EmulatedDiskCache(medium, 1 << 20, writeback_after=5.0)
    dc.pwrite(b"e" * 512, 0)
    assert dc.expire(now=time.monotonic() + 1) == 0  # not old enough yet
    assert medium.data[:512] == bytes(512)
    assert dc.expire(now=time.monotonic() + 10) == 512
    assert medium.data[:512] == b"e" * 512 and dc.dirty_bytes == 0


def test_concurrent_writers_and_flushes_lose_nothing_flushed():
    medium, _dc, pc = stack(host=8192, disk=4096)

    def writer(t: int) -> None:
        for i in range(50):
            pc.pwrite(bytes([t + 1]) * 512, (t * 50 + i) * 512 % 65536)
            if i % 10 == 0:
                pc.flush()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    pc.flush()
    for t in range(2):
        for i in range(50):
            off = (t * 50 + i) * 512 % 65536
            assert medium.data[off] == t + 1


def test_writeback_sends_zero_runs_as_write_zeroes():
    calls = []

    class Spy(MemoryDisk):
        def pwrite(self, data, offset, *, fua=False):
            calls.append(("write", offset, len(data)))
            super().pwrite(data, offset)

        def zero(self, offset, length, **kw):
            calls.append(("zero", offset, length))
            super().zero(offset, length)

    medium = Spy(16384)
    medium.data[:] = b"q" * 16384
    dc = EmulatedDiskCache(medium, 1 << 20)
    dc.pwrite(b"a" * 1024, 0)
    dc.zero(1024, 4096)
    dc.pwrite(b"b" * 512, 5120)
    dc.flush()
    assert calls == [("write", 0, 1024), ("zero", 1024, 4096), ("write", 5120, 512)]
    assert bytes(medium.data[:5632]) == b"a" * 1024 + bytes(4096) + b"b" * 512
