"""The power-loss lab over real NBD clients: qemu-io writes, a power cut (or a crash), a fresh qemu-io reads back.

Every mode's row of the safety table, observed from outside: the served process is ``cachemode serve --lab``,
the writes come from qemu-io (flushed, FUA, and plain), qemu-io then aborts (a guest crash: no flush at close),
and ``cachemode lab power-cut`` / ``crash-process`` act through the control socket.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachemode.lab.record import read_log
from cachemode.modes import MODES, Failure, get_mode
from tests.conftest import run_cli

pytestmark = pytest.mark.interop

if shutil.which("qemu-io") is None:
    pytest.skip("qemu-io (qemu-utils) is not installed", allow_module_level=True)


class LabServer:
    def __init__(self, tmp: Path, mode: str, *extra: str) -> None:
        self.image = tmp / "lab.img"
        self.sock = tmp / "nbd.sock"
        self.control = tmp / "ctl.sock"
        self.uri = f"nbd+unix:///?socket={self.sock}"
        argv = [
            sys.executable,
            "-m",
            "cachemode",
            "serve",
            str(self.image),
            "--create",
            "4M",
            "--cache",
            mode,
            "--socket",
            str(self.sock),
            "--lab",
            "--control",
            str(self.control),
            *extra,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (self.control.exists() and self.sock.exists()):
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("serve --lab did not come up")
            time.sleep(0.05)

    def lab(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = run_cli("lab", *args, "--control", str(self.control), timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc

    def qemu_io(self, *cmds: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
        # -r: a read-only client sends no FLUSH when it closes (a writable one does, even with -t unsafe)
        argv = ["qemu-io", "-f", "raw", "-t", "writeback", *(["-r"] if read_only else [])]
        for cmd in cmds:
            argv += ["-c", cmd]
        return subprocess.run([*argv, self.uri], capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# (pattern, offset, how): flushed by a later FLUSH, FUA on its own, and never flushed
FLUSHED = (0x11, 0, "flushed")
FUA = (0x33, 128 * 1024, "fua")
PLAIN = (0x22, 64 * 1024, "plain")


def guest_writes(srv: LabServer) -> None:
    out = srv.qemu_io(
        f"write -P {FLUSHED[0]} {FLUSHED[1]} 64k",
        "flush",
        f"write -P {PLAIN[0]} {PLAIN[1]} 64k",
        f"write -f -P {FUA[0]} {FUA[1]} 64k",
        "abort",  # the guest dies: qemu-io never sends the FLUSH it would send at close
    )
    # abort(3) loses qemu-io's buffered stdout; the server's count of acknowledged writes tells instead
    assert out.returncode == -signal.SIGABRT, out.stderr
    assert '"writes_acknowledged": 3' in srv.lab("status", "--json").stdout


def survived(srv: LabServer, write: tuple[int, int, str]) -> bool:
    out = srv.qemu_io(f"read -P {write[0]} {write[1]} 64k", read_only=True)
    assert out.returncode in (0, 1) and "read 65536/65536" in out.stdout, out.stdout + out.stderr
    return "Pattern verification failed" not in out.stdout


CASES = [(m.name, "64M") for m in MODES] + [("none", "0")]


@pytest.mark.parametrize("mode, disk_cache", CASES)
def test_power_cut_matches_the_safety_table(tmp_path, mode, disk_cache):
    srv = LabServer(tmp_path, mode, "--disk-cache", disk_cache, "--record", str(tmp_path / "w.log"))
    try:
        guest_writes(srv)
        srv.lab("power-cut")
        table = get_mode(mode).survival(Failure.POWER_LOSS)
        # worst case: "may be lost" is lost, unless nothing volatile held it (none over a cacheless device)
        plain_expected = table.acked or (get_mode(mode).direct and disk_cache == "0")
        assert survived(srv, PLAIN) == plain_expected
        assert survived(srv, FLUSHED) == table.flushed
        assert survived(srv, FUA) == table.flushed
    finally:
        srv.stop()
    log = read_log(tmp_path / "w.log")
    names = [(e.name, e.offset, e.fua) for e in log.entries]
    if get_mode(mode).guest_write_cache():
        assert names == [("write", 0, False), ("flush", 0, False), ("write", PLAIN[1], False), ("write", FUA[1], True)]
    else:  # told of no write cache (no SEND_FLUSH/SEND_FUA), qemu-io sends neither
        assert names == [("write", 0, False), ("write", PLAIN[1], False), ("write", FUA[1], False)]


@pytest.mark.parametrize("mode", [m.name for m in MODES])
@pytest.mark.parametrize("failure", [Failure.GUEST_CRASH, Failure.PROCESS_CRASH])
def test_guest_and_process_crash_match_the_safety_table(tmp_path, mode, failure):
    srv = LabServer(tmp_path, mode)
    try:
        guest_writes(srv)  # ends in a guest crash: qemu-io aborts
        if failure is Failure.PROCESS_CRASH:
            assert "still in the host's caches" in srv.lab("crash-process").stdout
        table = get_mode(mode).survival(failure)
        assert table.acked and table.flushed  # the table: nothing acknowledged is lost to these failures
        for write in (FLUSHED, PLAIN, FUA):
            assert survived(srv, write)
        # the host's caches still hold what was volatile: a power cut now takes what the table says it may
        srv.lab("power-cut")
        power = get_mode(mode).survival(Failure.POWER_LOSS)
        assert survived(srv, PLAIN) == power.acked
        assert survived(srv, FLUSHED) == power.flushed
    finally:
        srv.stop()


def test_serve_lab_bad_options(tmp_path):
    proc = run_cli("serve", str(tmp_path / "x.img"), "--disk-cache", "0", timeout=60)
    assert proc.returncode == 2 and "--disk-cache needs --lab" in proc.stderr
    proc = run_cli("serve", "--lab", timeout=60)
    assert proc.returncode == 2 and "--lab needs an IMAGE" in proc.stderr


CHECKER = """
import sys
d = open(sys.argv[1], 'rb').read()
flushed = d[{f}:{f} + 65536] == bytes([{fp}]) * 65536
fua = d[{u}:{u} + 65536] == bytes([{up}]) * 65536
# the FUA write was issued after the FLUSH completed: a state holding it must hold the flushed write too
sys.exit(1 if fua and not flushed else 0)
"""


@pytest.mark.parametrize("mode, expect_rc", [("writeback", 0), ("none", 0), ("unsafe", 1)])
def test_explore_a_log_recorded_over_nbd(tmp_path, mode, expect_rc):
    log = tmp_path / "w.log"
    srv = LabServer(tmp_path, "writeback", "--record", str(log))
    try:
        guest_writes(srv)
    finally:
        srv.stop()
    base = tmp_path / "base.img"
    base.write_bytes(bytes(4 << 20))
    checker = tmp_path / "check.py"
    checker.write_text(CHECKER.format(f=FLUSHED[1], fp=FLUSHED[0], u=FUA[1], up=FUA[0]))
    out = tmp_path / "r.json"
    proc = run_cli(
        "crash",
        "explore",
        str(log),
        "--base",
        str(base),
        "--cache",
        mode,
        "--check",
        f"{sys.executable} {checker} {{image}}",
        "--states",
        "60",
        "--seed",
        "3",
        "--jobs",
        "2",
        "--json",
        str(out),
        timeout=120,
    )
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["states"]["checked"] > 5 and report["log"]["writes"] == 3
    assert (report["states"]["failed"] > 0) == (expect_rc == 1)


def test_control_path_that_is_not_a_socket_is_refused_and_kept(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    proc = run_cli(
        "serve",
        str(tmp_path / "x.img"),
        "--create",
        "1M",
        "--lab",
        "--socket",
        str(tmp_path / "nbd.sock"),
        "--control",
        str(precious),
        timeout=60,
    )
    assert proc.returncode == 2 and "is not a socket" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("command", ["crash-process", "power-cut"])
def test_a_crash_drops_open_connections(tmp_path, command):
    from cachemode.nbd.client import Client, ClientError

    srv = LabServer(tmp_path, "writeback")
    try:
        client = Client(socket_path=str(srv.sock))
        client.pwrite(b"\x55" * 4096, 0)
        srv.lab(command)
        deadline = time.monotonic() + 30
        with pytest.raises((ClientError, ConnectionError)):
            while time.monotonic() < deadline:  # the abort is scheduled on the server's loop: it lands soon
                client.pread(4096, 0)
                time.sleep(0.05)
        client.sock.close()
        # a new connection is served, from what survived
        with Client(socket_path=str(srv.sock)) as fresh:
            data = fresh.pread(4096, 0)
        assert data == (b"\x55" * 4096 if command == "crash-process" else bytes(4096))
    finally:
        srv.stop()


def test_background_writeback_over_nbd(tmp_path):
    srv = LabServer(tmp_path, "writeback", "--writeback-after", "0.1")
    try:
        guest_writes(srv)
        deadline = time.monotonic() + 30
        while '"writes_volatile": 0' not in srv.lab("status", "--json").stdout:
            assert time.monotonic() < deadline, "background writeback never happened"
            time.sleep(0.1)
        srv.lab("power-cut")
        assert survived(srv, PLAIN)  # written back by the emulated kernel before the power went
    finally:
        srv.stop()
