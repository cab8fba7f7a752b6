"""Fixtures shared by the whole suite: real image files and, where the machine allows, real filesystems."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tls_certs import Certificates, make_certificates

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run_cli(
    *args: str, input: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cachemode ARGS`` for real and capture its text output (``env``: added variables)."""
    return subprocess.run(
        [sys.executable, "-m", "cachemode", *args],
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 1 MiB raw image full of random data (allocated, so O_DIRECT probing sees real blocks)."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def no_odirect_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem that refuses O_DIRECT: a ramfs mounted for the test (needs root)."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a ramfs (a filesystem without O_DIRECT) needs root and mount(8)")
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a 16 MiB loop device with 4096-byte logical sectors (needs root and losetup)."""
    backing = tmp_path / "loop-backing.img"
    backing.write_bytes(os.urandom(16 << 20))
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup(8)")
    result = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", str(backing)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {result.stderr.strip()}")
    device = result.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


# -- the real guest (tests/vm, the kernel NBD client) ----------------------------------------------------------
BOOT_TIMEOUT = 150.0  # seconds a test lets one guest boot run before it is killed


@pytest.fixture(scope="session")
def guest_kernel() -> object:
    """The guest kernel (``cachemode vm setup``; ``make test`` runs it), fetched here if it is missing.

    Skips, naming what is missing, where QEMU or static busybox is not installed or no kernel can be fetched.
    """
    from cachemode.vm import VmError
    from cachemode.vm.kernel import find_kernel, setup

    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: {package})")
    try:
        return find_kernel()
    except VmError:
        pass
    try:
        return setup()
    except VmError as exc:
        pytest.skip(f"no guest kernel and 'cachemode vm setup' failed: {exc}")


# -- TLS (tests/interop/test_nbd_tls.py, test_serve_security.py) -------------------------------------------------
@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, a server certificate, a client certificate and one from another CA (see tests/tls_certs.py)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (Debian: openssl)")
    return make_certificates(tmp_path_factory.mktemp("tls"))
