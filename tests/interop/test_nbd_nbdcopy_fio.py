"""Bulk data through ``cachemode serve``: nbdcopy round trip and fio's crc32c verification."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.nbd.serving import MIB, need, run, served

pytestmark = pytest.mark.interop


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_nbdcopy_256m_in_and_out(tmp_path: Path, mode: str) -> None:
    need("nbdcopy")
    size = 256 * MIB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        block = os.urandom(MIB)
        for i in range(size // MIB):
            f.write(block[i:] + block[:i])
    with served(tmp_path / "disk.img", mode, size=size) as srv:
        run(["nbdcopy", "--flush", str(src), srv.uri], timeout=180)
        out = tmp_path / "out.img"
        run(["nbdcopy", srv.uri, str(out)], timeout=180)
    assert sha256(out) == sha256(src)
    assert sha256(tmp_path / "disk.img") == sha256(src)


@pytest.mark.parametrize("mode", ["writeback", "directsync"])
def test_fio_verify_crc32c(tmp_path: Path, mode: str) -> None:
    need("fio")
    with served(tmp_path / "disk.img", mode, size=64 * MIB) as srv:
        res = run(
            [
                "fio",
                "--name=verify",
                "--ioengine=nbd",
                f"--uri={srv.uri}",
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=16",
                "--size=32m",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",  # no *-verify.state file left in the working directory
                # fsync becomes NBD_CMD_FLUSH: only where the server says it has a write cache (libnbd
                # refuses a flush the server did not advertise)
                *(["--fsync=32"] if mode == "writeback" else []),
            ],
            timeout=180,
        )
    assert "verify:" not in res.stderr.lower() or "bad" not in res.stderr.lower(), res.stderr
    assert " err= 0" in res.stdout, res.stdout
