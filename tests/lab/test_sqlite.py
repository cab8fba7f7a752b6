"""Real SQLite on the lab disk: crash states per mode and synchronous setting."""

from __future__ import annotations

import json

import pytest

from cachemode.lab.explore import CrashModel, CrashState
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.record import read_log
from cachemode.lab.sqlite import DiskFS, _connect, check_state, run_workload, sqlite_lab
from cachemode.modes import get_mode
from tests.conftest import run_cli

STATES = 300


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough", "directsync"])
def test_no_violation_with_synchronous_full(mode):
    work, report = sqlite_lab(mode, synchronous="FULL", states=STATES, seed=1)
    assert work.commits == 40
    assert report.checked > 100
    assert report.failed == 0, report.failures[:1]
    if mode in ("writeback", "none"):  # reordered and torn states were really tried
        assert report.by_kind["subset"] > 0 and report.by_kind["torn"] > 0


@pytest.mark.parametrize("mode, synchronous", [("unsafe", "FULL"), ("writeback", "OFF")])
def test_violations_found(mode, synchronous):
    _work, report = sqlite_lab(mode, synchronous=synchronous, states=STATES, seed=1)
    assert report.failed > 0
    assert "lost-commit" in report.violations
    assert set(report.violations) <= {"lost-commit", "integrity", "balance", "unreadable"}


def test_checker_sees_committed_state_and_catches_a_lost_commit(tmp_path):
    work = run_workload("writeback", str(tmp_path / "w.log"), transfers=5)
    log = read_log(tmp_path / "w.log")
    model = CrashModel(log, get_mode("writeback"))
    n = len(log.entries)
    everything = CrashState(n, "prefix", tuple(model.durable(n)), tuple(model.candidates(n)))
    image = bytearray(work.base)
    for i in everything.durable + everything.kept:
        e = log.entries[i]
        image[e.offset : e.offset + e.length] = e.data if e.kind == 1 else bytes(e.length)
    assert check_state(bytearray(image), everything, model).ok
    # The base (before any transfer) is consistent but misses the 5 commits marked in the log.
    out = check_state(bytearray(work.base), everything, model)
    assert not out.ok and out.kinds == ("lost-commit",)
    # A database sector overwritten with garbage is caught.
    fs = DiskFS(MemoryDisk(bytes(image)))
    db = _connect(fs)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    fs.close()
    assert pages >= 2
    image[64 * 1024 + 4096 : 64 * 1024 + 8192] = b"\xff" * 4096
    bad = check_state(image, everything, model)
    assert not bad.ok and bad.kinds[0] in ("integrity", "unreadable")


def test_cli_exit_status_and_json(tmp_path):
    out = tmp_path / "r.json"
    ok = run_cli("lab", "sqlite", "--cache", "directsync", "--states", "50", "--transfers", "10", "--json", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "no violation" in ok.stdout
    data = json.loads(out.read_text())
    assert data["workload"]["commits"] == 10 and data["states"]["failed"] == 0
    bad = run_cli("lab", "sqlite", "--cache", "unsafe", "--states", "50", "--transfers", "10")
    assert bad.returncode == 1
    assert "VIOLATIONS" in bad.stdout
