"""A real Linux guest on the lab disk, one boot per mode: the power cut lands where asked, and what ext4 kept
after it is what the mode promises (checked here on the host with e2fsck and debugfs, not only by the run).

Each test boots one guest (5-9 s under TCG); every boot has a hard deadline (``BOOT_TIMEOUT``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cachemode.modes import get_mode
from cachemode.vm.kernel import GuestKernel
from cachemode.vm.run import RunOptions, run_vm
from tests.conftest import BOOT_TIMEOUT, run_cli

pytestmark = pytest.mark.slow


def crash_run(tmp_path: Path, mode: str, **kw: Any) -> dict[str, Any]:
    opts = RunOptions(mode=mode, keep=tmp_path / "run", verify_boot=False, timeout=BOOT_TIMEOUT, **kw)
    return run_vm(opts)


def acknowledged(keep: Path) -> list[tuple[int, str, str, str]]:
    """The steps the guest reported on its serial console: (number, kind, name, md5)."""
    text = (keep / "console-crash.log").read_text()
    return [(int(n), k, name, md5) for n, k, name, md5 in re.findall(r"cm: step (\d+) (\w+) (\S+) (\S+)", text)]


def host_view(image: Path, tmp: Path) -> dict[str, bytes]:
    """Replay the journal on a copy, insist on a clean e2fsck -fn, and read every file with debugfs."""
    copy = tmp / "host-check.img"
    shutil.copyfile(image, copy)
    subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(copy)], capture_output=True, timeout=60)
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /", str(copy)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    files = {}
    for line in listing.splitlines():
        parts = line.strip().strip("/").split("/")  # inode/mode/uid/gid/name/size
        if len(parts) >= 6 and parts[1].startswith("100"):
            cat = subprocess.run(["debugfs", "-R", f"cat /{parts[4]}", str(copy)], capture_output=True, timeout=60)
            files[parts[4]] = cat.stdout
    return files


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def expected_write_cache(mode: str, write_cache: bool = True) -> str:
    return "write back" if get_mode(mode).guest_write_cache(write_cache) else "write through"


def test_writeback_keeps_every_fsynced_file_and_explore_passes(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_cli(
        "vm", "run", "--cache", "writeback", "--files", "20", "--explore", "40", "--keep", str(tmp_path / "run"),
        "--timeout", str(BOOT_TIMEOUT), "--json", str(out), timeout=4 * BOOT_TIMEOUT,
    )  # fmt: skip
    result = json.loads(out.read_text()) if out.exists() else {}
    summary = {k: v for k, v in result.items() if k not in ("files", "lab")}
    assert proc.returncode == 0, (proc.stderr, summary)
    assert result["guest_write_cache"] == expected_write_cache("writeback") == "write back"
    assert (result["fsynced_total"], result["fsynced_lost"], result["fsck_clean"]) == (10, 0, True), summary
    assert result["lab"]["flushes"] >= 10  # every fsync reached the server
    assert result["verify_boot"]["agrees_with_host"], (result["files"], result["verify_boot"])
    states = result["explore"]["states"]
    assert states["failed"] == 0 < states["checked"], result["explore"]["failures"]
    steps = acknowledged(tmp_path / "run")
    files = host_view(tmp_path / "run" / "disk.img", tmp_path)
    for _, kind, name, digest in steps:
        if kind == "fsynced":
            assert md5(files[name]) == digest, name


def test_none_cut_lands_after_the_asked_step_and_the_device_cache_loses_unflushed(
    guest_kernel: GuestKernel, tmp_path: Path
) -> None:
    # direct: steps 1-10 overwrite their file with O_DIRECT and fsync it, steps 11-20 with O_DIRECT only
    result = crash_run(tmp_path, "none", workload="direct", files=20, cut_after=15)
    assert result["guest_write_cache"] == expected_write_cache("none")
    assert result["cut_after"] == "15" and result["steps"] == 15
    steps = acknowledged(tmp_path / "run")
    assert [n for n, *_ in steps] == list(range(1, 16))
    files = host_view(tmp_path / "run" / "disk.img", tmp_path)
    for i in range(16, 21):  # nothing after the cut was written: still the synced zeros
        assert files[f"f{i:03d}"] == bytes(8192)
    assert (result["fsynced_total"], result["fsynced_lost"], result["fsck_clean"]) == (10, 0, True)
    # acknowledged by the device, never flushed: O_DIRECT skipped the page cache, the device cache lost them
    assert (result["unsynced_total"], result["unsynced_lost"]) == (5, 5)
    assert result["lab"]["lost_at_power_cut"]["writes"] >= 5
    for _, kind, name, digest in steps:
        assert (md5(files[name]) == digest) == (kind == "fsynced"), name


def test_writethrough_keeps_everything_acknowledged_rename(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    result = crash_run(tmp_path, "writethrough", workload="rename", files=12)
    assert result["guest_write_cache"] == expected_write_cache("writethrough") == "write through"
    lab = result["lab"]
    assert lab["lost_at_power_cut"]["writes"] == 0 and lab["writes_volatile"] == 0
    assert lab["writes_durable"] == lab["writes_acknowledged"] > 0
    assert (result["fsynced_lost"], result["fsck_clean"], result["corrupt_files"]) == (0, True, [])
    files = host_view(tmp_path / "run" / "disk.img", tmp_path)
    for i in range(1, 13):  # replaced by rename: the old or the new version, never empty or torn
        name = f"f{i:03d}"
        assert files[name] == f"old {name}\n".encode() or len(files[name]) == 7168, name


def test_directsync_sqlite_keeps_every_commit(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    # EXTRA: in the default rollback-journal mode, FULL leaves the journal's unlink (the commit) unsynced, so
    # the last COMMIT can be rolled back after a power cut in any mode (measured; SQLite documents it).
    result = crash_run(tmp_path, "directsync", workload="sqlite", files=15, sqlite_sync="EXTRA")
    assert result["guest_write_cache"] == expected_write_cache("directsync")
    assert result["lab"]["lost_at_power_cut"]["writes"] == 0
    assert result["sqlite"]["integrity"] == "ok"
    assert (result["sqlite"]["commits_acknowledged"], result["sqlite"]["commits_missing"]) == (15, 0)
    assert result["fsck_clean"]


def test_unsafe_loses_fsynced_files_and_explore_ext4_finds_failures(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    log = tmp_path / "write.log"
    result = crash_run(tmp_path, "unsafe", files=20, record=log)
    assert result["guest_write_cache"] == expected_write_cache("unsafe") == "write back"
    assert result["fsynced_total"] == 10 and result["fsynced_lost"] > 0
    assert result["lab"]["lost_at_power_cut"]["writes"] > 0 and result["lab"]["flushes"] > 0
    files = host_view(tmp_path / "run" / "disk.img", tmp_path)
    assert not any(files.get(f"f{i:03d}") for i in range(2, 21, 2))  # the fsynced files are gone
    out = tmp_path / "explore.json"
    proc = run_cli(
        "crash", "explore", str(log), "--base", str(tmp_path / "run" / "base.img"), "--cache", "unsafe",
        "--check", "ext4", "--states", "400", "--jobs", "2", "--json", str(out), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["states"]["failed"] > 0
    assert report["log"]["barriers"] == 0  # unsafe: no flush is a barrier


USER_WORKLOAD = """
i=1
while [ $i -le 6 ]; do
  head -c 4096 /dev/urandom > u$i
  /usr/bin/sha256sum u$i > u$i.sum || say error "the host's sha256sum did not run in the guest"
  sync u$i; sync .
  cm_step fsynced u$i
  i=$((i + 1))
done
"""


def test_none_on_a_lying_device_loses_fsynced_files(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    # also a user's --workload FILE, running a host program brought in with --with
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        pytest.skip("sha256sum (coreutils) not installed")
    script = tmp_path / "mine.sh"
    script.write_text(USER_WORKLOAD)
    log = tmp_path / "write.log"
    result = crash_run(tmp_path, "none", workload=str(script), programs=(sha256sum,), disk_flush="ignore", record=log)
    assert result["guest_write_cache"] == "write back"
    assert result["steps"] == 6 and result["lab"]["flushes"] >= 6  # the guest flushed; the device kept nothing
    assert result["fsynced_lost"] == result["fsynced_total"] == 6
    assert result["lab"]["lost_at_power_cut"]["writes"] == result["lab"]["writes_acknowledged"] > 0
    from cachemode.lab.record import FLUSH, read_log

    assert not [e for e in read_log(log).entries if e.kind == FLUSH or e.fua]  # its log has no barriers
