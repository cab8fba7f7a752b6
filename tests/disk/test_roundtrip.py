"""Data integrity: random unaligned I/O against a plain bytearray model, in every mode, and under threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachemode.disk import open_disk

SIZE = 64 * 1024

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 9000), st.booleans()),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 20000), st.booleans()),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(0, 9000), st.just(False)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
)


@pytest.mark.parametrize("mode", ["none", "directsync", "writeback", "unsafe"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=15), seed=st.binary(min_size=16, max_size=16))
def test_random_io_matches_model(tmp_path: Path, mode: str, ops: list, seed: bytes) -> None:
    path = tmp_path / f"model-{mode}.img"
    initial = (seed * (SIZE // len(seed)))[:SIZE]
    path.write_bytes(initial)
    model = bytearray(initial)
    with open_disk(path, mode) as disk:
        for kind, offset, length, flag in ops:
            length = min(length, SIZE - offset)
            if kind == "write":
                data = os.urandom(length)
                disk.pwrite(data, offset, fua=flag)
                model[offset : offset + length] = data
            elif kind == "zero":
                disk.zero(offset, length, may_trim=flag)
                model[offset : offset + length] = bytes(length)
            elif kind == "read":
                assert disk.pread(length, offset) == bytes(model[offset : offset + length])
            else:
                disk.flush()
        assert disk.pread(SIZE, 0) == bytes(model)
    assert path.read_bytes() == bytes(model)


@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_concurrent_unaligned_writes_sharing_blocks(image: Path, mode: str) -> None:
    """Eight threads own interleaved 300-byte slices; every 4 KiB block holds slices of several threads.

    Each write is a read-modify-write of whole blocks underneath, so without serialisation of overlapping
    padded ranges a thread would write back a neighbour's stale bytes and the final check would fail.
    """
    threads, slice_len, rounds = 8, 300, 12
    span = 3 * 4096
    with open_disk(image, mode) as disk:

        def writer(tid: int) -> None:
            for r in range(rounds):
                value = bytes([(tid * 16 + r) % 256]) * slice_len
                for start in range(tid * slice_len, span, threads * slice_len):
                    disk.pwrite(value[: min(slice_len, span - start)], 1000 + start)

        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        data = disk.pread(span, 1000)
    for start in range(0, span, slice_len):
        tid = (start // slice_len) % threads
        expected = (tid * 16 + rounds - 1) % 256
        piece = data[start : start + slice_len]
        assert piece == bytes([expected]) * len(piece), f"slice at {start} (thread {tid}) was clobbered"


def test_concurrent_zero_and_write_sharing_blocks(image: Path) -> None:
    """Write-zeroes pads its unaligned edges by read-modify-write too, under the same range lock."""
    with open_disk(image, "none") as disk:
        done = threading.Event()

        def zeroer() -> None:
            for _ in range(50):
                disk.zero(100, 4000)  # bytes 100..4099: a partial head block and a partial next block
            done.set()

        def writer() -> None:
            for i in range(50):
                disk.pwrite(bytes([i % 255 + 1]) * 50, 4100)  # bytes 4100..4149, sharing block 1 with the zeroes

        t1, t2 = threading.Thread(target=zeroer), threading.Thread(target=writer)
        t1.start(), t2.start()
        t1.join(), t2.join()
        assert done.is_set()
        assert disk.pread(4000, 100) == bytes(4000)
        assert disk.pread(50, 4100) == bytes([49 % 255 + 1]) * 50
