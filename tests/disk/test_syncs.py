"""Which operations reach stable storage, observed for real: the syscalls a workload makes, under strace.

Each mode runs the same small workload in a fresh process traced by ``strace -f -y``; we count fdatasync
calls and RWF_DSYNC writes on the image's descriptor. The expected counts follow from QEMU's semantics:
writeback and none sync on FLUSH (skipping a flush with nothing written since the last one) and on a clean
close; FUA writes use RWF_DSYNC; O_DSYNC modes never need either; unsafe never syncs at all; with the
guest's write cache off, writeback and none make every write durable (RWF_DSYNC) and unsafe stays unsafe.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKLOAD = """
import sys
from cachemode.disk import open_disk
disk = open_disk(sys.argv[1], sys.argv[2], write_cache=sys.argv[3] == "on")
for i in range(3):
    disk.pwrite(b"w" * 4096, i * 4096)
disk.flush()
disk.flush()              # nothing written since the last flush: no fdatasync needed
disk.pwrite(b"f" * 4096, 0, fua=True)
disk.pwrite(b"f" * 100, 50000, fua=True)
disk.flush()
disk.pwrite(b"l" * 4096, 8192)
disk.close()              # a clean close flushes, except in unsafe
"""

# mode, write cache -> (fdatasync calls, RWF_DSYNC writes)
EXPECTED = {
    ("writeback", "on"): (3, 2),
    ("none", "on"): (3, 2),
    ("writethrough", "on"): (0, 0),
    ("directsync", "on"): (0, 0),
    ("unsafe", "on"): (0, 0),
    ("writeback", "off"): (3, 6),
    ("none", "off"): (3, 6),
    ("writethrough", "off"): (0, 0),
    ("unsafe", "off"): (0, 0),
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (make test installs it)")
@pytest.mark.parametrize(("mode", "write_cache"), list(EXPECTED), ids=lambda v: str(v))
def test_sync_calls_per_mode(image: Path, tmp_path: Path, mode: str, write_cache: str) -> None:
    log = tmp_path / "strace.log"
    subprocess.run(
        ["strace", "-f", "-y", "-o", str(log), "-e", "trace=fdatasync,fsync,pwritev,pwritev2",
         sys.executable, "-c", WORKLOAD, str(image), mode, write_cache],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    calls = [line for line in log.read_text().splitlines() if str(image) in line and "resumed" not in line]
    fdatasyncs = sum(1 for line in calls if "fdatasync(" in line)
    fsyncs = sum(1 for line in calls if "fsync(" in line and "fdatasync(" not in line)
    dsync_writes = sum(1 for line in calls if "pwritev2(" in line and "RWF_DSYNC" in line)
    writes = sum(1 for line in calls if "pwritev" in line)
    assert writes >= 6, f"workload writes not seen in strace output:\n{log.read_text()}"
    assert fsyncs == 0
    assert (fdatasyncs, dsync_writes) == EXPECTED[(mode, write_cache)], "\n".join(calls)
