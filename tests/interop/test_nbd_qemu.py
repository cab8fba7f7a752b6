"""qemu-io and qemu-img against ``cachemode serve`` (in-process server, real QEMU clients)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.nbd.serving import MIB, need, run, served

pytestmark = pytest.mark.interop


def qemu_io(uri: str, *commands: str, writeback: bool = True) -> str:
    args = ["qemu-io", "-f", "raw"]
    if writeback:
        args += ["-t", "writeback"]
    args.append(uri)
    for cmd in commands:
        args += ["-c", cmd]
    res = run(args)
    out = res.stdout + res.stderr
    assert "failed" not in out.lower(), out
    return out


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough", "unsafe"])
def test_qemu_io_patterns_fua_zero_discard_flush(tmp_path: Path, mode: str) -> None:
    need("qemu-io")
    with served(tmp_path / "disk.img", mode) as srv:
        out = qemu_io(
            srv.uri,
            "write -P 0xab 0 64k",
            "flush",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 1M 4k",  # FUA
            "read -P 0xcd 1M 4k",
            "write -P 0x11 3000 5000",  # unaligned
            "read -P 0x11 3000 5000",
            "read -P 0xab 0 3000",
            "write -P 0x22 2M 1M",
            "write -z 2M 512k",  # WRITE_ZEROES with NO_HOLE
            "read -P 0 2M 512k",
            "read -P 0x22 2560k 512k",
            "write -P 0x33 4M 1M",
            "write -z -u 4M 1M",  # may unmap
            "read -P 0 4M 1M",
            "discard 16M 64k",
            "flush",
        )
        assert "Pattern verification failed" not in out
        # qemu-io's default cache mode (writethrough) sets FUA on every write when the server offers FUA
        qemu_io(srv.uri, "write -P 0x44 8M 64k", "read -P 0x44 8M 64k", writeback=False)
    data = (tmp_path / "disk.img").read_bytes()
    assert data[1 << 20 : (1 << 20) + 4096] == b"\xcd" * 4096
    assert data[3000:8000] == b"\x11" * 5000
    assert data[2 * MIB : 2 * MIB + 512 * 1024] == bytes(512 * 1024)
    assert data[8 * MIB : 8 * MIB + 65536] == b"\x44" * 65536


def test_qemu_img_info_map_compare_convert(tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(32 * MIB)
        f.seek(MIB)
        f.write(os.urandom(MIB))
        f.seek(20 * MIB)
        f.write(b"\x5a" * (3 * MIB))
    with served(tmp_path / "disk.img", size=32 * MIB) as srv:
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
        assert info["virtual-size"] == 32 * MIB
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri])
        extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri]).stdout)
        data_ranges = [(e["start"], e["length"]) for e in extents if e["data"]]
        covered = sum(length for _, length in data_ranges)
        assert covered >= 4 * MIB and covered < 32 * MIB
        for start, length in [(MIB, MIB), (20 * MIB, 3 * MIB)]:
            assert any(s <= start and start + length <= s + n for s, n in data_ranges), extents
        back = tmp_path / "back.img"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(back)])
    assert back.read_bytes() == src.read_bytes()
