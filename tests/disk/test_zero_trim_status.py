"""Trim, write-zeroes and block status, observed on the real file (SEEK_DATA/SEEK_HOLE and st_blocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachemode.disk import HOLE, ZERO, FastZeroUnsupported, open_disk

MIB = 1 << 20


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    return path


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_block_status_reports_data_and_holes(sparse: Path, mode: str) -> None:
    with open_disk(sparse, mode) as disk:
        disk.pwrite(os.urandom(MIB), MIB)
        disk.flush()
        extents = disk.block_status(0, disk.size)
    assert [(e.offset, e.length, e.flags) for e in extents] == [
        (0, MIB, HOLE | ZERO),
        (MIB, MIB, 0),
        (2 * MIB, 2 * MIB, HOLE | ZERO),
    ]


def test_block_status_of_a_subrange_is_clipped(sparse: Path) -> None:
    with open_disk(sparse) as disk:
        disk.pwrite(b"x" * 4096, MIB)
        extents = disk.block_status(MIB - 100, 200)
    assert extents[0].offset == MIB - 100 and extents[0].flags == HOLE | ZERO
    assert sum(e.length for e in extents) == 200
    assert extents[-1].flags == 0


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough"])
def test_trim_punches_a_hole(sparse: Path, mode: str) -> None:
    with open_disk(sparse, mode) as disk:
        disk.pwrite(os.urandom(2 * MIB), 0)
        disk.flush()
        before = allocated(sparse)
        disk.trim(MIB // 2, MIB)
        assert disk.pread(MIB, MIB // 2) == bytes(MIB)
        assert allocated(sparse) <= before - MIB
        holes = [e for e in disk.block_status(0, 2 * MIB) if e.flags & HOLE]
        assert (holes[0].offset, holes[0].length) == (MIB // 2, MIB)


def test_zero_without_holes_keeps_allocation(sparse: Path) -> None:
    with open_disk(sparse) as disk:
        disk.pwrite(os.urandom(2 * MIB), 0)
        disk.flush()
        before = allocated(sparse)
        disk.zero(0, MIB, may_trim=False)
        assert disk.pread(MIB, 0) == bytes(MIB)
        assert allocated(sparse) >= before  # ZERO_RANGE: still allocated, reads as zeros
        disk.zero(MIB, MIB, may_trim=True)
        assert disk.pread(MIB, MIB) == bytes(MIB)
        assert allocated(sparse) <= before - MIB  # punched


def test_unaligned_zero_and_trim_under_odirect(tmp_path: Path) -> None:
    path = tmp_path / "data.img"
    original = os.urandom(MIB)
    path.write_bytes(original)
    with open_disk(path, "none") as disk:
        disk.zero(1000, 10000)
        disk.trim(20000, 9000)  # advisory: rounded inward to whole blocks
        data = disk.pread(MIB, 0)
    assert data[:1000] == original[:1000]
    assert data[1000:11000] == bytes(10000)
    assert data[11000:20000] == original[11000:20000]
    block = 4096
    trimmed_start = -(-20000 // block) * block
    trimmed_end = 29000 // block * block
    assert data[trimmed_start:trimmed_end] == bytes(trimmed_end - trimmed_start)
    assert data[trimmed_end:] == original[trimmed_end:]


def test_fast_zero_on_a_filesystem_without_fallocate(no_odirect_dir: Path) -> None:
    """ramfs has no fallocate modes: FAST_ZERO must fail and leave the data; a plain zero writes zeros."""
    path = no_odirect_dir / "disk.img"
    original = os.urandom(256 * 1024)
    path.write_bytes(original)
    with open_disk(path, "writeback") as disk:
        with pytest.raises(FastZeroUnsupported):
            disk.zero(4096, 8192, fast=True)
        assert disk.pread(8192, 4096) == original[4096:12288]
        assert not disk.can_fast_zero
        disk.zero(4096, 8192)
        assert disk.pread(8192, 4096) == bytes(8192)
        disk.trim(65536, 65536)  # advisory: no punch hole here, so nothing happens and nothing fails
        assert disk.pread(65536, 65536) == original[65536:131072]
