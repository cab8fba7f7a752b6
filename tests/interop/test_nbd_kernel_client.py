"""The Linux kernel's NBD client (nbd-client + the nbd module): what SEND_FLUSH tells it, and real block I/O.

The kernel maps the flags to its queue's write-cache setting: SEND_FLUSH means "write back", and then an
fsync makes it send NBD_CMD_FLUSH; without it the device is "write through" and no FLUSH is ever sent.
This needs root and the nbd module (``modprobe nbd``); where the kernel has none, the test says so and skips.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("mode", "write_cache", "expected"),
    [("writeback", True, "write back"), ("writethrough", True, "write through"), ("none", False, "write through")],
)
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
