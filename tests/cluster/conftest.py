"""One real Dask cluster on 127.0.0.1 for the tests that need it: a ``dask scheduler`` and two ``dask worker``
processes, started once per session (the tests using it share one xdist group, so one pytest worker owns it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("distributed")

WORKERS = 2


@dataclass
class DaskCluster:
    address: str
    directory: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``dask ARGS`` in its own process group, its output in the cluster's directory."""
        log = open(self.directory / f"proc-{len(self.procs)}.log", "wb")  # noqa: SIM115 (the process owns it)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=env,
            process_group=0,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str, env: dict[str, str] | None = None, nanny: bool = True) -> subprocess.Popen[bytes]:
        return self.start(
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--name",
            name,
            "--no-dashboard",
            *([] if nanny else ["--no-nanny"]),
            env=env,
        )

    def workers(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler sees them now."""
        from distributed import Client

        with Client(self.address, timeout="10s") as client:
            info = client.scheduler_info(n_workers=-1)
        return {str(w["name"]): addr for addr, w in info["workers"].items()}

    def wait_for(self, names: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not names <= set(self.workers()):
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {names} did not join; logs in {self.directory}")
            time.sleep(0.2)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while name in self.workers():
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not leave")
            time.sleep(0.2)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process and its group (a worker's nanny takes its worker along)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    directory = tmp_path_factory.mktemp("dask")
    info = directory / "scheduler.json"
    cluster = DaskCluster("", directory)
    try:
        sched = cluster.start(
            "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(info)
        )
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            if sched.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dask scheduler did not start; log in {directory}")
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written in one go, but give a partial write no chance
        cluster.address = json.loads(info.read_text())["address"]
        for i in range(WORKERS):
            cluster.start_worker(f"w{i}")
        cluster.wait_for({f"w{i}" for i in range(WORKERS)})
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            kill(proc)
