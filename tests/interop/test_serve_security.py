"""``cachemode serve``'s security options as a process: --tls and its certificates, --tls-psk, the warning for a
disk served beyond loopback without TLS, and owner-only Unix sockets whatever the umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cachemode.cli.tls import exposure_warning
from cachemode.nbd.handshake import TLSMode
from cachemode.nbd.tls import TLSConfig, TLSSetupError, read_psk_file, x509_context
from tests.conftest import run_cli
from tests.nbd.serving import ROOT, ServeProcess, need, run
from tests.tls_certs import Certificates

pytestmark = pytest.mark.interop


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_serve_tls_require_from_the_command_line(tmp_path: Path, tls_certs: Certificates) -> None:
    need("nbdinfo")
    image = tmp_path / "disk.img"
    args = [str(image), "--create", "4M", "--tls", "require", "--tls-certificates", str(tls_certs.server)]
    srv = ServeProcess([*args, "--tls-verify-peer"])
    try:
        assert srv.uri.startswith("nbds://127.0.0.1:")
        assert "tls=require(x509 verify-peer)" in srv.ready
        info = json.loads(run(["nbdinfo", "--json", f"{srv.uri}?tls-certificates={tls_certs.client}"]).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 << 20
    finally:
        rc, _, err = srv.stop()
    assert rc == 0 and "warning" not in err  # loopback: no exposure warning


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--tls", "require"], ["needs either --tls-certificates DIR or --tls-psk FILE"]),
        (["--tls-certificates", "/nonexistent"], ["--tls-certificates needs --tls on or --tls require"]),
        (["--tls", "on", "--tls-certificates", "/nonexistent"], ["/nonexistent: no server-cert.pem, server-key.pem"]),
    ],
)
def test_bad_tls_options_are_one_line_errors(tmp_path: Path, extra: list[str], words: list[str]) -> None:
    one_line_error(run_cli("serve", str(tmp_path / "x.img"), "--create", "1M", *extra), *words)


def test_verify_peer_needs_the_ca_certificate(tmp_path: Path, tls_certs: Certificates) -> None:
    partial = tmp_path / "certs"
    partial.mkdir()
    for name in ("server-cert.pem", "server-key.pem"):
        (partial / name).write_bytes((tls_certs.server / name).read_bytes())
    x509_context(partial, verify_peer=False)  # enough without client certificates
    with pytest.raises(TLSSetupError, match=r"no ca-cert\.pem"):
        x509_context(partial, verify_peer=True)
    (partial / "server-key.pem").write_text("not a key\n")
    with pytest.raises(TLSSetupError, match="cannot load the certificates"):
        x509_context(partial, verify_peer=False)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python 3.13 has TLS-PSK")
def test_tls_psk_names_the_python_it_needs(tmp_path: Path) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:0123456789abcdef0123456789abcdef\n")
    proc = run_cli("serve", str(tmp_path / "x.img"), "--create", "1M", "--tls", "require", "--tls-psk", str(psk))
    one_line_error(proc, "--tls-psk needs Python 3.13 or later")


def test_psk_file_format(tmp_path: Path) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:0123456789abcdef\n\nbob:00ff\n")
    assert read_psk_file(psk) == {"alice": bytes.fromhex("0123456789abcdef"), "bob": b"\x00\xff"}
    psk.write_text("alice:0123\nbob-without-key\n")
    with pytest.raises(TLSSetupError, match=r"keys.psk:2: not a 'username:hexkey' line"):
        read_psk_file(psk)
    psk.write_text("carol:xyz\n")
    with pytest.raises(TLSSetupError, match=r":1: not a"):
        read_psk_file(psk)


def test_exposure_warning_beyond_loopback_without_tls_require(tls_certs: Certificates) -> None:
    required = TLSConfig(TLSMode.REQUIRE, x509_context(tls_certs.server, False), "x509")
    offered = TLSConfig(TLSMode.ON, required.context, "x509")
    for bind in ("0.0.0.0", "::", "", "192.0.2.7", "nbd.example"):
        warning = exposure_warning(bind, None, None)
        assert warning is not None and "anyone who can reach this port" in warning and "\n" not in warning
        assert exposure_warning(bind, None, offered) is not None  # optional TLS: a plain client still gets in
        assert exposure_warning(bind, None, required) is None
    for bind in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert exposure_warning(bind, None, None) is None
    assert exposure_warning("0.0.0.0", "/run/nbd.sock", None) is None  # a Unix socket: see the next test


def test_unix_sockets_are_owner_only_under_umask_0(tmp_path: Path) -> None:
    nbd_sock, control = tmp_path / "nbd.sock", tmp_path / "control.sock"
    cmd = [sys.executable, "-m", "cachemode", "serve", str(tmp_path / "lab.img"), "--create", "1M", "--lab"]
    cmd += ["--socket", str(nbd_sock), "--control", str(control)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, umask=0)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "nbd+unix://" in ready, (ready, proc.stderr.read() if proc.poll() is not None else "")
        for path in (nbd_sock, control):
            mode = os.lstat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, (path, oct(mode))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock", "lab.img", "nbd.sock"]  # no leftovers
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_socket_path_never_replaces_a_file(tmp_path: Path) -> None:
    precious = tmp_path / "disk.img"
    precious.write_text("keep me")
    proc = run_cli("serve", "--create", "1M", str(tmp_path / "x.img"), "--socket", str(precious), timeout=60)
    one_line_error(proc, "is not a socket")
    assert precious.read_text() == "keep me"
