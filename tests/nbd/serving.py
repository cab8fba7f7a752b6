"""Test helpers: run the NBD server in a background thread, or ``cachemode serve`` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachemode.disk import open_disk
from cachemode.nbd.server import Server, new_event_loop

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def need(*tools: str) -> None:
    """Skip the calling test, naming the tool, when a client binary is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: qemu-utils, libnbd-bin, nbdkit, fio, strace)")


def need_libnbd_python() -> None:
    need("nbdsh")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True)
    if probe.returncode:
        pytest.skip("python3-libnbd not installed for /usr/bin/python3")


class ThreadServer:
    """A :class:`Server` on its own event loop in a daemon thread, listening on 127.0.0.1:<ephemeral>, or on
    the Unix socket ``unix``."""

    def __init__(self, disk: Any, export_name: str = "", unix: Path | None = None, **server_options: Any) -> None:
        self.disk = disk
        self.loop = new_event_loop()
        self.server = Server(disk, export_name=export_name, loop=self.loop, **server_options)
        if unix is None:
            self.port = self.loop.run_until_complete(self.server.start_tcp("127.0.0.1", 0))
        else:
            self.loop.run_until_complete(self.server.start_unix(str(unix)))
        self.uri = self.server.uri
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout=10), self.loop)
        fut.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def served(
    path: Path,
    mode: str = "writeback",
    *,
    write_cache: bool = True,
    read_only: bool = False,
    size: int = 64 * MIB,
    export_name: str = "",
    unix: Path | None = None,
) -> Iterator[ThreadServer]:
    """Open (creating if needed) ``path`` as a disk and serve it for the duration of the block (on the Unix
    socket ``unix``, if given)."""
    if not path.exists():
        open_disk(path, "writeback", create_size=size).close()
    disk = open_disk(path, mode, write_cache=write_cache, read_only=read_only)
    srv = ThreadServer(disk, export_name=export_name, unix=unix)
    try:
        yield srv
    finally:
        srv.stop()
        disk.close()


class ServeProcess:
    """``cachemode serve`` as a subprocess; waits for its ready line and parses the URI from it."""

    def __init__(
        self,
        args: list[str],
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        unix: Path | None = None,
    ) -> None:
        listen = ["--socket", str(unix)] if unix else ["--port", "0"]
        cmd = [*(prefix or []), sys.executable, "-m", "cachemode", "serve", *listen, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        match = re.search(r"(nbds?(?:\+unix)?://\S+)", self.ready)
        if not match:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"no ready line: {self.ready!r} {err}")
        self.uri = match.group(1)
        self.pid = self.proc.pid

    def server_pid(self) -> int:
        """The pid of the Python server (the child of strace when traced)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        for _ in range(50):
            kids = children.read_text().split() if children.exists() else []
            if kids:
                return int(kids[0])
            if (
                "python" in Path(f"/proc/{self.pid}/comm").read_text()
                or "cachemode" in Path(f"/proc/{self.pid}/cmdline").read_text()
            ):
                return self.pid
            time.sleep(0.05)
        return self.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str, str]:
        """Signal the server (not a tracer around it) and wait; never leave a process behind."""
        if self.proc.poll() is None:
            os.kill(self.server_pid(), sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.kill(self.server_pid(), signal.SIGKILL)
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode, out, err


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def nbdsh(uri: str, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a libnbd Python script with ``h`` connected to ``uri`` (system python, python3-libnbd)."""
    prologue = 'import nbd, sys\nh = nbd.NBD()\nh.add_meta_context("base:allocation")\nh.connect_uri(sys.argv[1])\n'
    return run(["/usr/bin/python3", "-c", prologue + script, uri], timeout=timeout)


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False): a bound for a loaded
    machine, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
