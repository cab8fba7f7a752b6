"""A device that lies (``--disk-flush ignore``): FLUSH and FUA are acknowledged, nothing is written back."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemode.lab.disk import LabConfig, LabDisk, LabError
from cachemode.lab.layers import EmulatedDiskCache, MemoryDisk
from cachemode.lab.record import FLUSH, read_log
from tests.conftest import run_cli


def test_flush_and_fua_reach_the_medium_only_on_an_honest_device():
    for honour in (True, False):
        medium = MemoryDisk(64 * 1024)
        dc = EmulatedDiskCache(medium, 1 << 20, honour_flush=honour)
        dc.pwrite(b"a" * 4096, 0)
        dc.flush()
        dc.pwrite(b"f" * 512, 8192, fua=True)
        assert (medium.data[0:4096] == b"a" * 4096) is honour
        assert (medium.data[8192:8704] == b"f" * 512) is honour
        dc.power_cut()
        assert dc.pread(4096, 0) == (b"a" * 4096 if honour else bytes(4096))


@pytest.mark.parametrize("mode", ["none", "writethrough", "writeback"])
def test_every_acknowledged_write_is_lost_on_a_lying_device(mode: str, tmp_path: Path):
    log = tmp_path / "w.log"
    disk = LabDisk(MemoryDisk(1 << 16), mode, LabConfig(disk_flush="ignore", record=str(log)))
    disk.pwrite(b"x" * 4096, 0)
    disk.pwrite(b"y" * 4096, 4096, fua=True)
    disk.flush()
    assert disk.status()["disk_flush"] == "ignore"
    cut = disk.power_cut()
    assert cut["lost_now"]["writes"] == 2
    assert disk.pread(8192, 0) == bytes(8192)
    entries = read_log(log).entries
    assert [e.kind for e in entries if e.kind == FLUSH] == [] and not any(e.fua for e in entries)


def test_unknown_disk_flush_policy_is_refused():
    with pytest.raises(LabError, match="disk-flush"):
        LabConfig(disk_flush="sometimes")


def test_serve_disk_flush_needs_lab(tmp_path: Path):
    proc = run_cli("serve", str(tmp_path / "x.img"), "--create", "1M", "--disk-flush", "ignore")
    assert proc.returncode == 2
    assert "--disk-flush" in proc.stderr and "--lab" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_lab_with_a_lying_device_serves(tmp_path: Path):
    from tests.nbd.serving import ServeProcess

    srv = ServeProcess([str(tmp_path / "x.img"), "--create", "1M", "--lab", "--disk-flush", "ignore"])
    try:
        assert "cache=writeback" in srv.ready
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err
