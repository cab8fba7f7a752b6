"""The server's fast paths observed for real: ``cachemode serve`` under strace, a libnbd client, and the bytes
checked on both sides (what the client reads back, what the image file holds)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.nbd.serving import MIB, ServeProcess, nbdsh, need, need_libnbd_python

pytestmark = pytest.mark.interop


def need_strace() -> None:
    need("strace")
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("strace cannot trace here (ptrace not permitted)")


def traced(image: Path, trace: Path, calls: str, *args: str) -> ServeProcess:
    return ServeProcess(
        [str(image), "--create", "16M", *args], prefix=["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(trace)]
    )


# A page-cache read must not wait on the device in any buffered mode: O_DSYNC makes writes durable and
# leaves reads alone, and the write cache switched off makes writes FUA -- neither changes a read.
@pytest.mark.parametrize(
    "args",
    [["--cache", "writethrough"], ["--cache", "writeback", "--write-cache", "off"], ["--cache", "writeback"]],
    ids=["writethrough", "writeback-wc-off", "writeback"],
)
def test_buffered_reads_are_served_inline_in_every_buffered_mode(tmp_path: Path, args: list[str]) -> None:
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "preadv2,pread64,sendfile", *args)
    try:
        script = (
            "small = bytes(range(256)) * 16\n"
            "big = bytes(reversed(range(256))) * 4096\n"
            f"h.pwrite(small, {4 * MIB})\n"
            f"h.pwrite(big, {8 * MIB})\n"
            f"assert h.pread(4096, {4 * MIB}) == small\n"
            f"assert h.pread({MIB}, {8 * MIB}) == big\n"
            "print('ok')\n"
        )
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    text = trace.read_text()
    # The 4 KiB read: one preadv2 with RWF_NOWAIT in the event loop (a pool read would be a plain pread64).
    assert re.search(rf"preadv2\(\d+, .*iov_len=4096\}}\], 1, {4 * MIB}, RWF_NOWAIT\) = 4096", text), text
    assert not re.search(rf"pread64\(\d+, .*, 4096, {4 * MIB}\)", text), text
    # The 1 MiB read: straight from the image to the socket.
    assert re.search(rf"sendfile\(\d+, \d+, \[{8 * MIB}\] => \[\d+\], {MIB}\)", text), text
    assert image.read_bytes()[4 * MIB : 4 * MIB + 4096] == bytes(range(256)) * 16
