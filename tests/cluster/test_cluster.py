"""The same work on a real Dask cluster (scheduler and worker processes on 127.0.0.1) and locally: the same
answer. Also a worker killed mid-run, a hanging checker, and a checker the workers do not have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cachemode.cpu.sweep import sweep
from cachemode.cpu.trace import read_trace
from cachemode.execution import DaskExecutor, LocalExecutor
from cachemode.lab.disk import LabConfig, LabDisk
from cachemode.lab.explore import CommandChecker, ExploreError, explore
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.record import read_log
from cachemode.lab.sqlite import sqlite_lab
from cachemode.modes import get_mode
from tests.cluster.conftest import DaskCluster, kill
from tests.conftest import run_cli

pytestmark = pytest.mark.xdist_group("dask")

SIZE = 256 * 1024
SLOT = 4096
TIMINGS = ("seconds", "prepare_seconds", "ms_per_state", "materialise", "where")

# A checker of write order within an epoch: slot 10's write (the 11th) without slot 8's fails. It writes to the
# image too (as a journal replay would), which must not leak into later states.
ORDER_CHECK = """\
import os, sys
img = sys.argv[1]
with open(img, "rb") as f:
    d = f.read()
has = lambda j: d[j * 4096] == j + 1
if os.environ.get("CM_TAG") and len(sys.argv) > 2:
    with open(sys.argv[2], "a") as f:
        f.write(os.environ["CM_TAG"] + "\\n")
    import time; time.sleep(0.1)
if "hang" in sys.argv[2:] and has(10) and not has(8) and not has(9):
    import subprocess; subprocess.run(["sleep", "987.654"])
with open(img, "r+b") as f:
    f.seek(200 * 1024); f.write(b"J" * 8192)
sys.exit(1 if has(10) and not has(8) else 0)
"""


@pytest.fixture
def workload(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A log of 24 writes (one 4 KiB slot each, content j+1), a FLUSH after every 6; its zero base; the checker."""
    log = tmp_path / "w.log"
    disk = LabDisk(MemoryDisk(SIZE), "writeback", LabConfig(record=str(log)))
    for j in range(24):
        disk.pwrite(bytes([j + 1]) * SLOT, j * SLOT)
        if j % 6 == 5:
            disk.flush()
    disk.close()
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    script = tmp_path / "order_check.py"
    script.write_text(ORDER_CHECK)
    return log, base, script


def answer(report) -> dict:
    """The report without what may differ by where it ran (timings, how states were materialised)."""
    return {k: v for k, v in report.as_dict().items() if k not in TIMINGS}


def test_explore_on_the_cluster_gives_the_local_report(dask_cluster: DaskCluster, workload):
    log, base, script = workload
    checker = CommandChecker(f"{sys.executable} {script} {{image}}")
    wlog, mode = read_log(log), get_mode("writeback")
    local = explore(wlog, mode, base=str(base), checker=checker, states=80, seed=3, jobs=2)
    seen: dict[str, int] = {}
    with DaskExecutor(dask_cluster.address) as ex:
        remote = explore(
            wlog,
            mode,
            base=str(base),
            checker=checker,
            states=80,
            seed=3,
            executor=ex,
            progress=lambda phase, done, total: seen.__setitem__(phase, done),
        )
        # the base given as bytes (no shared file): workers write it out once, the answer is the same
        scattered = explore(wlog, mode, base_bytes=base.read_bytes(), checker=checker, states=80, seed=3, executor=ex)
    assert local.failed > 0 and local.passed > 0  # the checker tells states apart
    assert answer(remote) == answer(local) == answer(scattered)
    assert remote.where.startswith("dask tcp://127.0.0.1")
    assert seen == {"building": 80, "checking": remote.checked}
    assert base.read_bytes() == bytes(SIZE)


def test_cli_explore_with_the_scheduler_from_the_environment(dask_cluster: DaskCluster, workload, tmp_path):
    log, base, script = workload
    args = ("crash", "explore", str(log), "--base", str(base), "--check", f"{sys.executable} {script} {{image}}")
    args += ("--states", "60", "--seed", "1", "--json", "-")
    local = run_cli(*args, "--jobs", "2")
    remote = run_cli(*args, env={"CACHEMODE_SCHEDULER": dask_cluster.address})
    assert local.returncode == remote.returncode == 1, remote.stderr  # some state failed
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert b["where"].startswith("dask ") and a["where"] == "local, 2 threads"
    assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}


def test_sqlite_state_checking_on_the_cluster(dask_cluster: DaskCluster):
    _, local = sqlite_lab("writeback", synchronous="OFF", states=120, transfers=10, seed=2)
    with DaskExecutor(dask_cluster.address) as ex:
        _, remote = sqlite_lab("writeback", synchronous="OFF", states=120, transfers=10, seed=2, executor=ex)
    assert local.failed > 0  # synchronous=OFF loses commits: there is something to agree on
    assert answer(remote) == answer(local)


@pytest.fixture(scope="module")
def mm_trace(tmp_path_factory) -> str:
    """A matrix multiply's trace (din, 4-byte elements), made here: the tests need no ../shared."""
    path = tmp_path_factory.mktemp("trace") / "mm.din"
    proc = run_cli("trace", "synth", "mm-naive", "-n", "24", "--elem", "4", "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return str(path)


def test_sweep_on_the_cluster(dask_cluster: DaskCluster, mm_trace):
    path = mm_trace
    grid = ([1024, 4096, 16384], [1, 4, 0])
    local = sweep(path, *grid, executor=LocalExecutor(2))  # streamed here, chunk by chunk
    with DaskExecutor(dask_cluster.address) as ex:
        remote = sweep(read_trace(path), *grid, executor=ex)  # the event stream is sent to the workers
        shared = sweep(path, *grid, executor=ex)  # they read the file
        parsed = ex.everywhere(lambda: __import__("cachemode.cpu.sweep", fromlist=["_"])._stream_of.cache_info())
    want = [(p.size, p.assoc, p.stats) for p in local]
    assert [(p.size, p.assoc, p.stats) for p in remote] == want == [(p.size, p.assoc, p.stats) for p in shared]
    assert len(local) == 9
    assert sum(info.misses for info in parsed.values()) >= 1  # some worker parsed the shared trace itself


def test_a_worker_killed_mid_run_has_its_states_checked_elsewhere(dask_cluster: DaskCluster, workload, tmp_path):
    log, base, script = workload
    ran = tmp_path / "ran.txt"
    ran.touch()
    checker = CommandChecker(f"{sys.executable} {script} {{image}} {ran}")
    wlog, mode = read_log(log), get_mode("writeback")
    victim = dask_cluster.start_worker("victim", env={**os.environ, "CM_TAG": "victim"}, nanny=False)
    dask_cluster.wait_for({"victim"})
    result: dict[str, object] = {}

    def run() -> None:
        try:
            with DaskExecutor(dask_cluster.address) as ex:
                result["report"] = explore(wlog, mode, base=str(base), checker=checker, states=60, seed=4, executor=ex)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while "victim" not in ran.read_text():  # the victim is checking a state right now
        assert time.monotonic() < deadline and thread.is_alive(), result
        time.sleep(0.02)
    kill(victim)
    thread.join(120)
    assert not thread.is_alive() and "error" not in result, result
    dask_cluster.wait_gone("victim")
    local = explore(wlog, mode, base=str(base), checker=CommandChecker(checker.command), states=60, seed=4, jobs=2)
    assert answer(result["report"]) == answer(local)


def test_a_hanging_checker_is_killed_and_reported_as_timeout(dask_cluster: DaskCluster, workload):
    log, base, script = workload
    checker = CommandChecker(f"{sys.executable} {script} {{image}} hang", timeout=1)
    wlog, mode = read_log(log), get_mode("writeback")
    local = explore(wlog, mode, base=str(base), checker=checker, states=40, seed=5, jobs=2)
    with DaskExecutor(dask_cluster.address) as ex:
        remote = explore(wlog, mode, base=str(base), checker=checker, states=40, seed=5, executor=ex)
    assert local.violations.get("timeout", 0) > 0
    assert answer(remote) == answer(local)
    timed_out = [f for f in remote.failures if f["kinds"] == ["timeout"]]
    assert timed_out and "timed out after 1 s" in timed_out[0]["output"]
    # the checker's own child (the sleep) went with it: the whole process group is killed
    left = subprocess.run(["pgrep", "-f", "sleep 987.654"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_a_checker_the_workers_lack_is_named(dask_cluster: DaskCluster, workload, tmp_path, monkeypatch):
    log, base, _ = workload
    here = tmp_path / "bin"
    here.mkdir()
    prog = here / "cm-check-only-here"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", f"{here}:{os.environ['PATH']}")  # the client has it; the workers' PATH does not
    checker = CommandChecker("cm-check-only-here {image}")
    wlog, mode = read_log(log), get_mode("writeback")
    assert explore(wlog, mode, base=str(base), checker=checker, states=5).failed == 0
    with DaskExecutor(dask_cluster.address) as ex, pytest.raises(ExploreError) as err:
        explore(wlog, mode, base=str(base), checker=checker, states=5, executor=ex)
    assert "'cm-check-only-here' not found" in str(err.value) and "workers" in str(err.value)


def test_cli_scheduler_errors_are_one_line(tmp_path, workload, mm_trace):
    log, base, _ = workload
    proc = run_cli(
        "crash", "explore", str(log), "--base", str(base), "--check", "true {image}", "--scheduler", "bad://x"
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--scheduler bad://x" in proc.stderr, proc.stderr
    proc = run_cli("sim", "sweep", mm_trace, "--sizes", "1k", "--assoc", "1", "--workers", "2")
    assert proc.returncode == 0, proc.stderr  # --workers stays an alias of --jobs


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_ctrl_c_cancels_the_run_and_its_checkers(dask_cluster: DaskCluster, workload, where):
    log, base, _ = workload
    marker = f"31.{os.getpid()}{len(where)}"  # a sleep no other test runs
    argv = [sys.executable, "-m", "cachemode", "crash", "explore", str(log), "--base", str(base)]
    argv += ["--check", f"sh -c 'sleep {marker}' {{image}}", "--states", "40"]
    argv += ["--scheduler", dask_cluster.address] if where == "cluster" else ["--jobs", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", f"^(sh -c )?sleep {marker}"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    deadline = time.monotonic() + 10  # the checkers were killed, here or on the workers
    while subprocess.run(["pgrep", "-f", f"^(sh -c )?sleep {marker}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a checker outlived the cancelled run"
        time.sleep(0.1)
    if where == "cluster":
        from distributed import Client

        with Client(dask_cluster.address, timeout="10s") as client:
            deadline = time.monotonic() + 10
            while any(client.processing().values()):
                assert time.monotonic() < deadline, client.processing()
                time.sleep(0.1)
