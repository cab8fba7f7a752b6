"""``cachemode serve`` as a process: the ready line, signals, bad arguments, and durability observed for real
(the image's open flags in /proc/PID/fdinfo, the fdatasync and RWF_DSYNC calls under strace)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachemode.modes import get_mode
from cachemode.nbd import constants as c
from cachemode.nbd.client import Client
from tests.conftest import run_cli
from tests.nbd.serving import MIB, ROOT, ServeProcess, need

pytestmark = pytest.mark.interop


def client_for(uri: str) -> Client:
    match = re.match(r"nbd://([^:/]+):(\d+)/", uri)
    assert match, uri
    return Client(match.group(1), int(match.group(2)))


def image_fd(pid: int, image: Path) -> int:
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == str(image):
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"{image} not open in {pid}")


def fdinfo_flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags line")


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough", "directsync", "unsafe"])
def test_ready_line_open_flags_and_sigterm(tmp_path: Path, mode: str) -> None:
    image = tmp_path / "disk.img"
    srv = ServeProcess([str(image), "--create", "16M", "--cache", mode])
    try:
        assert f"cache={mode}" in srv.ready and srv.uri.startswith("nbd://127.0.0.1:")
        flags = fdinfo_flags(srv.pid, image_fd(srv.pid, image))
        expected = get_mode(mode).open_flags
        assert bool(flags & os.O_DIRECT) == ("O_DIRECT" in expected)
        assert bool(flags & os.O_DSYNC) == ("O_DSYNC" in expected)
        with client_for(srv.uri) as cl:
            told = bool(cl.flags & c.TF_SEND_FLUSH)
            assert told == get_mode(mode).guest_write_cache(True)
            assert bool(cl.flags & c.TF_SEND_FUA) == told
            cl.pwrite(b"\x77" * 4096, 8192)
            cl.flush()  # answered with success in every mode, advertised or not
            assert cl.pread(4096, 8192) == b"\x77" * 4096
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    assert image.read_bytes()[8192 : 8192 + 4096] == b"\x77" * 4096


def test_sigint_with_a_connection_open_exits_zero(tmp_path: Path) -> None:
    srv = ServeProcess([str(tmp_path / "d.img"), "--create", "8M"])
    cl = client_for(srv.uri)
    cl.pwrite(b"a" * 512, 0)
    rc, _, err = srv.stop(signal.SIGINT)
    assert rc == 0, err
    cl.sock.close()


def test_unix_socket_and_export_name(tmp_path: Path) -> None:
    need("qemu-io")
    sock = tmp_path / "nbd.sock"
    cmd = [sys.executable, "-m", "cachemode", "serve", str(tmp_path / "d.img"), "--create", "8M"]
    cmd += ["--socket", str(sock), "--export-name", "vol"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"nbd+unix:///vol?socket={sock}" in line, line
        out = subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                f"nbd+unix:///vol?socket={sock}",
                "-c",
                "write -P 0x42 0 4k",
                "-c",
                "read -P 0x42 0 4k",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "verification failed" not in out.stdout, out.stdout + out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cache", "bogus"], "bogus"),
        (["--port", "10", "--socket", "/tmp/x.sock"], "mutually exclusive"),
        (["/nonexistent/dir/img"], "no such image"),
        (["--port", "70000"], "out of range"),
        (["IMG", "--create", "12Q"], "invalid size"),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [str(tmp_path / "x.img") if a == "IMG" else a for a in args]
    res = run_cli("serve", *args, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_cli("serve", str(tmp_path / "x.img"), "--create", "1M", "--port", str(port), timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "cannot listen" in res.stderr


# mode -> (fdatasync calls for two FLUSHes with writes before each, FUA writes reach the disk durably)
DURABILITY = {
    "writeback": (2, True),
    "none": (2, True),
    "writethrough": (0, True),
    "directsync": (0, True),
    "unsafe": (0, False),
}


@pytest.mark.parametrize("mode", list(DURABILITY))
def test_flush_and_fua_syscalls_under_strace(tmp_path: Path, mode: str) -> None:
    need("strace")
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = ServeProcess(
        [str(image), "--create", "16M", "--cache", mode],
        prefix=["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync,pwritev2,sync_file_range", "-o", str(trace)],
    )
    try:
        with client_for(srv.uri) as cl:
            fua_flag = c.CMD_FLAG_FUA
            cl.pwrite(b"1" * 4096, 0)
            cl.flush()
            cl.pwrite(b"2" * 4096, 4096)
            cl.flush()
            marker = trace.read_text()
            cl.pwrite(b"3" * 4096, MIB, fua_flag)
            after_fua = trace.read_text()
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    flushes, fua_durable = DURABILITY[mode]
    syncs = re.findall(r"\b(fdatasync|fsync)\(", marker)
    assert len(syncs) == flushes, marker
    fua_part = after_fua[len(marker) :]
    fua_synced = "RWF_DSYNC" in fua_part or bool(re.search(r"\bfdatasync\(", fua_part))
    if get_mode(mode).write_durable_on_return:
        # O_DSYNC: the plain write is already durable; no extra sync is needed for FUA
        assert not re.search(r"\bfdatasync\(", fua_part), fua_part
    else:
        assert fua_synced == fua_durable, fua_part
    if mode == "unsafe":
        assert not re.search(r"\b(fdatasync|fsync)\(", trace.read_text())
