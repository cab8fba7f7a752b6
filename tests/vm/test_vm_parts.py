"""The guest's parts without booting it: the initramfs archive, programs with their libraries, module order,
the checker names, and the one-line errors of ``cachemode vm``."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachemode.lab.checkers import Ext4Checker, resolve_checker
from cachemode.lab.explore import CommandChecker, ExploreError
from cachemode.vm import VmError
from cachemode.vm.initramfs import Initramfs, shared_libraries
from cachemode.vm.kernel import GuestKernel, module_depends, scan_modules
from tests.conftest import REPO, run_cli


def test_newc_archive_is_read_back_by_cpio(tmp_path: Path):
    if shutil.which("busybox") is None:
        pytest.skip("busybox not installed")
    ram = Initramfs()
    ram.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    ram.add_file("etc/deep/x.txt", b"x" * 1001)
    ram.add_char_device("dev/console", 5, 1)
    path = tmp_path / "initrd.gz"
    ram.write(path)
    archive = gzip.decompress(path.read_bytes())
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True, check=True)
    assert {"init", "etc", "etc/deep", "etc/deep/x.txt", "dev/console"} <= set(listing.stdout.decode().split())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d", "init", "etc/deep/x.txt"], input=archive, cwd=out, check=True)
    assert (out / "etc/deep/x.txt").read_bytes() == b"x" * 1001
    assert os.stat(out / "init").st_mode & 0o777 == 0o755


def test_with_program_brings_its_shared_libraries():
    sqlite = shutil.which("sqlite3")
    if sqlite is None:
        pytest.skip("sqlite3 not installed")
    libs = {p.name for p in shared_libraries(Path(sqlite))}
    assert any(name.startswith("libsqlite3") for name in libs)
    assert any(name.startswith("ld-linux") for name in libs)  # the dynamic loader too, as dracut copies it
    ram = Initramfs()
    guest_path = ram.add_program("sqlite3")
    archive = ram.newc()
    assert guest_path.lstrip("/").encode() + b"\0" in archive
    assert b"libsqlite3" in archive
    with pytest.raises(VmError, match="no such program"):
        ram.add_program("no-such-program-here")


def test_modules_load_in_dependency_order(tmp_path: Path):
    def ko(name: str, depends: str) -> None:
        (tmp_path / f"{name}.ko").write_bytes(b"\x7fELF junk\x00license=GPL\x00depends=" + depends.encode() + b"\x00")

    ko("virtio_blk", "virtio,virtio_ring")
    ko("virtio_ring", "")
    ko("virtio", "virtio_ring")
    ko("nbd", "")
    assert module_depends(tmp_path / "virtio_blk.ko") == ["virtio", "virtio_ring"]
    kernel = GuestKernel(tmp_path / "vmlinuz", "test", scan_modules(tmp_path))
    order = [p.stem for p in kernel.load_order(["virtio_blk", "ext4", "nbd"])]  # ext4: no .ko, built in
    assert order == ["virtio_ring", "virtio", "virtio_blk", "nbd"]


def test_checker_names_are_told_apart_from_commands():
    assert isinstance(resolve_checker("ext4"), Ext4Checker)
    assert isinstance(resolve_checker("true {image}"), CommandChecker)
    with pytest.raises(ExploreError, match="not a built-in checker"):
        resolve_checker("xfs")


def _cli_with_path(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "cachemode", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_missing_qemu_names_the_package(tmp_path: Path):
    proc = _cli_with_path(str(tmp_path), "vm", "setup")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "install qemu-system-x86" in proc.stderr


def test_missing_busybox_names_the_package(tmp_path: Path):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86 not installed")
    (tmp_path / "qemu-system-x86_64").symlink_to(qemu)
    proc = _cli_with_path(str(tmp_path), "vm", "setup")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "install busybox-static" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "run", "--kernel", "/no/such/vmlinuz"], "--kernel /no/such/vmlinuz: no such file"),
        (["vm", "run", "--cut-after", "0"], "--cut-after"),
        (["vm", "run", "--workload", "/no/such/script.sh"], "neither a built-in workload"),
        (["vm", "matrix", "--disk-cache", "0"], "per row"),
        (["crash", "explore", "/no/log", "--base", "/no/base", "--check", "xfs"], "must contain {image}"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_setup_without_network_says_so(tmp_path: Path):
    if shutil.which("apt-get") is None or shutil.which("qemu-system-x86_64") is None or shutil.which("busybox") is None:
        pytest.skip("needs apt-get, qemu-system-x86 and busybox-static")
    proxy = "http://127.0.0.1:9"  # nothing listens there: every download is refused
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "http_proxy": proxy, "https_proxy": proxy}
    env["PYTHONPATH"] = str(REPO / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "cachemode", "vm", "setup"], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("cachemode: error: cannot download linux-image-") and "no network?" in error
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("vmlinuz"))


def test_matrix_rows_and_their_promises(tmp_path: Path):
    from cachemode.vm.matrix import ROWS, plot_rows, promised

    labels = {row.label: row for row in ROWS}
    assert {"writeback", "none", "writethrough", "directsync", "unsafe"} <= set(labels)
    assert promised(labels["unsafe"]) == "may lose fsynced"
    assert promised(labels["none wc=off"]) == "all acked kept"
    assert promised(labels["none disk-cache=0"]) == "fsynced kept"
    assert {(r.mode, r.disk_flush) for r in ROWS if r.disk_flush == "ignore"} == {
        ("none", "ignore"),
        ("writethrough", "ignore"),
    }
    rows = [
        {"row": row.label, "fsynced_lost": i % 3, "fsynced_total": 2, "unsynced_lost": 1, "unsynced_total": 0}
        for i, row in enumerate(ROWS)
    ]
    plot_rows(rows, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_kernel_says_to_run_setup(tmp_path: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "cachemode", "vm", "run"], capture_output=True, text=True, timeout=60, env=env
    )
    if "not found: install" in proc.stderr:
        pytest.skip(proc.stderr.strip())  # QEMU or busybox is missing: that error comes first
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "run 'cachemode vm setup'" in proc.stderr
