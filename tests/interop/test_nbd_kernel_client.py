"""The Linux kernel's NBD client (nbd-client + the nbd module): what SEND_FLUSH tells it, and real block I/O.

The kernel maps the flags to its queue's write-cache setting: SEND_FLUSH means "write back", and then an
fsync makes it send NBD_CMD_FLUSH; without it the device is "write through" and no FLUSH is ever sent.
On the host this needs root and the nbd module (``modprobe nbd``); where the host kernel has none, that test
skips, and the same checks run in a guest instead: the guest kernel's own nbd module and Debian's nbd-client,
reaching the server through QEMU user networking (``cachemode vm nbd-client``, see docs/vm.md).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cachemode.vm.kernel import GuestKernel
from cachemode.vm.nbdclient import kernel_client_run
from tests.conftest import BOOT_TIMEOUT
from tests.nbd.serving import MIB, need, run, served

pytestmark = pytest.mark.interop

DEVICE = "nbd0"


def _need_kernel_client() -> None:
    need("nbd-client")
    if os.geteuid() != 0:
        pytest.skip("the kernel NBD client needs root")
    if not Path(f"/sys/block/{DEVICE}").exists():
        pytest.skip("the Linux nbd module is not loaded here (no /sys/block/nbd0; modprobe nbd)")
    if Path(f"/sys/block/{DEVICE}/pid").exists():
        pytest.skip(f"/dev/{DEVICE} is already connected to another server")


CASES = [("writeback", True, "write back"), ("writethrough", True, "write through"), ("none", False, "write through")]


@pytest.mark.parametrize(("mode", "write_cache", "expected"), CASES)
def test_guest_kernel_client_write_cache_and_flush(
    guest_kernel: GuestKernel, mode: str, write_cache: bool, expected: str
) -> None:
    """The same checks with a guest's kernel as the client: one boot per case, under a hard deadline."""
    need("nbd-client")
    result = kernel_client_run(mode, write_cache, kernel=guest_kernel, timeout=BOOT_TIMEOUT)
    assert result["guest_write_cache"] == expected
    assert result["send_flush_advertised"] == (expected == "write back")
    assert (result["flushes_received"] > 0) == (expected == "write back")  # FLUSH only to a write-back device
    assert result["data_round_trip"]


@pytest.mark.parametrize(("mode", "write_cache", "expected"), CASES)
def test_kernel_client_write_cache_and_flush(tmp_path: Path, mode: str, write_cache: bool, expected: str) -> None:
    _need_kernel_client()
    image = tmp_path / "disk.img"
    pattern = tmp_path / "pattern.bin"
    pattern.write_bytes(os.urandom(MIB))
    with served(image, mode, write_cache=write_cache, export_name="disk") as srv:
        run(["nbd-client", "127.0.0.1", str(srv.port), f"/dev/{DEVICE}", "-N", "disk", "-b", "4096"])
        try:
            assert Path(f"/sys/block/{DEVICE}/queue/write_cache").read_text().strip() == expected
            flushes_before = srv.server.stats.flushes
            run(["dd", f"if={pattern}", f"of=/dev/{DEVICE}", "bs=64k", "oflag=direct", "conv=fsync", "seek=16"])
            back = subprocess.run(
                ["dd", f"if=/dev/{DEVICE}", "bs=64k", "count=16", "skip=16", "iflag=direct", "status=none"],
                capture_output=True,
                check=True,
            ).stdout
            assert back == pattern.read_bytes()
            sent_flush = srv.server.stats.flushes > flushes_before
            assert sent_flush == (expected == "write back")  # the kernel flushes only a write-back device
        finally:
            subprocess.run(["nbd-client", "-d", f"/dev/{DEVICE}"], capture_output=True, timeout=30)
    with open(image, "rb") as f:
        f.seek(16 * 64 * 1024)
        assert f.read(MIB) == pattern.read_bytes()
