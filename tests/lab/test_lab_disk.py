"""Every mode's row of the safety table, measured in the lab (in-process), and the lab disk's controls."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemode.lab.disk import LabConfig, LabDisk, LabError, open_lab_disk
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.matrix import run_matrix
from cachemode.modes import MODES, Failure, get_mode

MODE_NAMES = [m.name for m in MODES]


@pytest.mark.parametrize("disk_cache", [64 << 20, 0])
def test_matrix_agrees_with_the_mode_table(disk_cache):
    cells = run_matrix(LabConfig(disk_cache=disk_cache))
    assert len(cells) == len(MODES) * len(Failure)
    for cell in cells:
        mode, failure = get_mode(cell.mode), Failure(cell.failure)
        table = mode.survival(failure)
        assert cell.acked_unflushed > 0 and cell.flushed > 0
        if table.acked:
            assert cell.acked_unflushed_lost == 0, cell
        if table.flushed:
            assert cell.flushed_lost == 0, cell
        # "may be lost" must show as lost in the worst case, except where nothing volatile holds the data:
        # 'none' over a device without a write cache loses nothing.
        if not table.acked:
            expect_all = not (mode.direct and disk_cache == 0)
            assert cell.acked_unflushed_lost == (cell.acked_unflushed if expect_all else 0), cell
        if not table.flushed:
            assert cell.flushed_lost == cell.flushed, cell


def test_write_cache_off_makes_every_write_durable_except_in_unsafe():
    cells = run_matrix(LabConfig(), write_cache=False)
    for cell in cells:
        if cell.failure == Failure.POWER_LOSS.value:
            lost = cell.acked_unflushed_lost
            assert lost == (cell.acked_unflushed if cell.mode == "unsafe" else 0), cell


def test_random_survivors_keep_a_reproducible_subset_and_every_flushed_write():
    def run(seed: int) -> list[bool]:
        disk = LabDisk(MemoryDisk(1 << 16), "writeback", LabConfig())
        disk.pwrite(b"F" * 4096, 60 * 1024)
        disk.flush()
        for i in range(64):
            disk.pwrite(bytes([i + 1]) * 512, i * 512)
        st = disk.power_cut("random", seed)
        assert st["survivors"] == "random" and st["seed"] == seed
        assert disk.pread(4096, 60 * 1024) == b"F" * 4096
        return [disk.pread(512, i * 512) == bytes([i + 1]) * 512 for i in range(64)]

    kept = run(5)
    assert kept == run(5)
    assert 0 < sum(kept) < 64


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_stack_follows_the_mode(mode):
    disk = LabDisk(MemoryDisk(1 << 16), mode, LabConfig(disk_cache=0))
    names = [type(layer).__name__ for layer in disk.entry.stack()]
    assert ("EmulatedPageCache" in names) == (not get_mode(mode).direct)
    assert names[-2:] == ["EmulatedDiskCache", "MemoryDisk"]
    assert "ModeLayer" in names


def test_process_crash_keeps_host_state_and_power_cut_loses_it():
    disk = LabDisk(MemoryDisk(1 << 16), "writeback", LabConfig())
    disk.pwrite(b"k" * 4096, 0)
    st = disk.crash_process()
    assert st["writes_volatile"] == 1 and st["process_crashes"] == 1
    assert disk.pread(4096, 0) == b"k" * 4096
    st = disk.power_cut()
    assert st["writes_lost"] == 1 and st["lost_now"]["bytes"] == 4096
    assert disk.pread(4096, 0) == bytes(4096)


def test_status_counts_acknowledged_and_durable_writes():
    disk = LabDisk(MemoryDisk(1 << 16), "none", LabConfig(disk_cache=1 << 20))
    disk.pwrite(b"a" * 512, 0)
    disk.pwrite(b"b" * 512, 512, fua=True)
    st = disk.status()
    assert st["writes_acknowledged"] == 2 and st["writes_durable"] == 1 and st["writes_volatile"] == 1
    assert st["fua_writes"] == 1
    assert [layer["layer"] for layer in st["layers"]] == ["disk cache"]
    assert st["layers"][0]["dirty_bytes"] == 512
    disk.flush()
    st = disk.status()
    assert st["writes_durable"] == 2 and st["layers"][0]["dirty_bytes"] == 0


def test_image_file_holds_exactly_the_durable_state(tmp_path):
    path = tmp_path / "lab.img"
    disk = open_lab_disk(path, "writeback", LabConfig(), create_size=1 << 20)
    disk.pwrite(b"D" * 4096, 0)
    disk.flush()
    disk.pwrite(b"V" * 4096, 8192)
    raw = path.read_bytes()
    assert raw[:4096] == b"D" * 4096 and raw[8192 : 8192 + 4096] == bytes(4096)
    disk.power_cut()
    disk.close()
    raw = path.read_bytes()
    assert raw[:4096] == b"D" * 4096 and raw[8192 : 8192 + 4096] == bytes(4096)


def test_clean_close_writes_back_except_nothing_is_lost(tmp_path):
    path = tmp_path / "lab.img"
    disk = open_lab_disk(path, "unsafe", LabConfig(), create_size=1 << 20)
    disk.pwrite(b"U" * 512, 0)
    disk.close()  # a clean shutdown of the emulated host writes its caches back
    assert path.read_bytes()[:512] == b"U" * 512


def test_bad_lab_requests():
    with pytest.raises(LabError):
        LabConfig(disk_cache=-1)
    with pytest.raises(LabError):
        LabConfig(writeback_after=0)
    disk = LabDisk(MemoryDisk(4096), "writeback")
    with pytest.raises(LabError, match="survivor"):
        disk.power_cut("some")


def test_background_writeback_makes_old_dirty_data_durable():
    disk = LabDisk(MemoryDisk(1 << 16), "writeback", LabConfig(writeback_after=0.05))
    try:
        disk.pwrite(b"w" * 512, 0)
        deadline = time.monotonic() + 20
        while disk.status()["writes_volatile"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert disk.status()["writes_volatile"] == 0
        disk.power_cut()
        assert disk.pread(512, 0) == b"w" * 512
    finally:
        disk.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 15), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("zero"), st.integers(0, 15), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(
    ops=OPS,
    mode=st.sampled_from(MODE_NAMES),
    disk_cache=st.sampled_from([0, 4096, 1 << 20]),
    host_cache=st.sampled_from([1024, 1 << 20]),
)
def test_worst_case_power_cut_against_a_model_of_the_contract(ops, mode, disk_cache, host_cache):
    """After a worst-case power cut each block holds its durable content or, where a small cache had to write
    back early, a newer acknowledged one; never anything older. Durable = written with FUA (or in a mode where
    every write is), or completed before a FLUSH that completed; in unsafe, nothing.
    """
    m = get_mode(mode)
    blocks = 16
    disk = LabDisk(MemoryDisk(blocks * 512), mode, LabConfig(host_cache=host_cache, disk_cache=disk_cache))
    history = [[bytes(512)] for _ in range(blocks)]  # every acknowledged content of each block, oldest first
    durable = [0] * blocks  # index into history[b] of the content the contract guarantees
    counter = 0
    for kind, block, count, fua in ops:
        count = min(count, blocks - block)
        if kind == "flush":
            disk.flush()
            if not m.no_flush:
                durable = [len(h) - 1 for h in history]
            continue
        counter += 1
        content = bytes([counter]) * 512 if kind == "write" else bytes(512)
        if kind == "write":
            disk.pwrite(content * count, block * 512, fua=fua)
        else:
            disk.zero(block * 512, count * 512, fua=fua)
        for b in range(block, block + count):
            history[b].append(content)
            if not m.no_flush and (fua or m.every_write_durable()):
                durable[b] = len(history[b]) - 1
    disk.power_cut()
    # Where nothing volatile can hold a write, everything acknowledged survives; where the caches are roomy,
    # nothing reaches the medium but through a barrier, so the worst case leaves exactly the durable state.
    holds_nothing = m.every_write_durable() or (m.direct and disk_cache == 0)
    roomy = disk_cache >= blocks * 512 if m.direct else host_cache >= blocks * 512
    for b in range(blocks):
        after = disk.pread(512, b * 512)
        if holds_nothing:
            assert after == history[b][-1]
        elif roomy:
            assert after == history[b][durable[b]]
        else:
            assert after in history[b][durable[b] :]
