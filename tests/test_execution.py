"""The local side of the execution seam (the Dask side runs on a real cluster in tests/cluster/)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from cachemode.execution import ExecutionError, LocalExecutor, open_executor


def square(x: int, offset: int) -> int:
    time.sleep(0.01 * (x % 3))  # complete out of order
    return x * x + offset


def test_local_map_returns_every_result_with_its_index():
    with open_executor(3) as ex:
        got = dict(ex.map(square, list(range(20)), 1))
    assert got == {i: i * i + 1 for i in range(20)}
    assert ex.where == "local, 3 threads" and not ex.remote


def test_leaving_early_cancels_what_has_not_started():
    started: list[int] = []
    lock = threading.Lock()

    def slow(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.05)
        return x

    ex = LocalExecutor(2)
    results = ex.map(slow, list(range(100)))
    next(results)
    results.close()
    time.sleep(0.2)
    assert len(started) < 10


def test_jobs_must_be_positive():
    with pytest.raises(ExecutionError, match="--jobs"):
        LocalExecutor(0)


def test_a_local_run_never_imports_dask():
    code = (
        "import sys\n"
        "from cachemode.cli import main\n"
        "from cachemode.execution import open_executor\n"
        "import cachemode.lab.explore, cachemode.lab.sqlite, cachemode.cpu.sweep\n"
        "with open_executor(2) as ex: list(ex.map(abs, [-1, 2]))\n"
        "assert not {'dask', 'distributed'} & set(sys.modules), sorted(m for m in sys.modules if 'dask' in m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
