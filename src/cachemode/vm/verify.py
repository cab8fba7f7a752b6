"""What a crashed image kept, read on the host: journal replay, a forced fsck, then every file's content.

The image is checked as a freshly rebooted kernel would find it: ``e2fsck -y -E journal_only`` replays the
journal (``e2fsck -fn`` alone skips it and would judge the pre-journal filesystem), then ``e2fsck -fn`` checks
the result without changing it, then ``debugfs rdump`` copies the files out. Each file the guest reported counts
once: *intact* (the content it reported), *lost* (missing, empty, all zeros, or still the version it replaced) or
*corrupt* (present with other content). The SQLite workload is checked by opening the database (a hot
journal is rolled back as SQLite would), ``PRAGMA integrity_check``, and looking up every acknowledged commit.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cachemode.lab.checkers import ext4_replay_and_check
from cachemode.vm import VmError
from cachemode.vm.workloads import old_version

E2FSPROGS_HINT = "install e2fsprogs (apt-get install e2fsprogs)"
SYNCED_KINDS = ("fsynced",)
UNSYNCED_KINDS = ("wrote", "renamed")


def need_e2fsprogs() -> None:
    for tool in ("mkfs.ext4", "e2fsck", "debugfs"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} not found: {E2FSPROGS_HINT}")


def make_ext4(path: Path, size: int) -> None:
    """A fresh ext4 image of ``size`` bytes (the guest's disk)."""
    need_e2fsprogs()
    with open(path, "wb") as f:
        f.truncate(size)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise VmError(f"mkfs.ext4 {path}: {proc.stderr.strip()}")


def fsck_after_replay(image: Path, timeout: float = 120) -> tuple[bool, str]:
    """Replay the journal in place, then ``e2fsck -fn``; (clean, what e2fsck said)."""
    need_e2fsprogs()
    outcome = ext4_replay_and_check(str(image), timeout)
    return outcome.ok, outcome.output


def dump_files(image: Path, target: Path, timeout: float = 120) -> None:
    """Copy the filesystem's root directory out of ``image`` into ``target`` (debugfs rdump)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump / {target}", str(image)], capture_output=True, timeout=timeout)


@dataclass
class Verdict:
    """What the crashed image kept of the steps the guest acknowledged."""

    fsck_clean: bool
    fsck_output: str
    files: dict[str, str] = field(default_factory=dict)  # name -> intact | lost | corrupt
    totals: dict[str, int] = field(default_factory=dict)
    corrupt_files: list[str] = field(default_factory=list)
    sqlite: dict[str, object] | None = None


def classify(content: bytes | None, md5: str, name: str) -> str:
    if content is None or not content or content == old_version(name) or not content.strip(b"\0"):
        return "lost"
    return "intact" if hashlib.md5(content).hexdigest() == md5 else "corrupt"


def verify_image(crashed: Path, work: Path, steps: list[tuple[int, str, str, str]], sqlite_sync: str) -> Verdict:
    """Check a copy of ``crashed`` against the acknowledged ``steps`` (number, kind, name, md5)."""
    copy = work / "verify.img"
    shutil.copyfile(crashed, copy)
    clean, output = fsck_after_replay(copy)
    files = work / "files"
    if files.exists():
        shutil.rmtree(files)
    dump_files(copy, files)
    verdict = Verdict(clean, output)
    expected: dict[str, tuple[str, str]] = {}
    commits: list[int] = []
    for _, kind, name, md5 in steps:
        if kind == "committed":
            commits.append(int(name))
        else:
            expected[name] = (kind, md5)
    totals = {"fsynced_total": 0, "fsynced_lost": 0, "unsynced_total": 0, "unsynced_lost": 0}
    for name, (kind, md5) in expected.items():
        path = files / name
        content = path.read_bytes() if path.is_file() else None
        state = classify(content, md5, name)
        verdict.files[name] = state
        group = "fsynced" if kind in SYNCED_KINDS else "unsynced"
        totals[f"{group}_total"] += 1
        if state != "intact":
            totals[f"{group}_lost"] += 1
        if state == "corrupt":
            verdict.corrupt_files.append(name)
    if commits:
        verdict.sqlite = check_sqlite(files, commits)
        group = "unsynced" if sqlite_sync.upper() == "OFF" else "fsynced"
        totals[f"{group}_total"] += len(commits)
        totals[f"{group}_lost"] += int(verdict.sqlite["commits_missing"])  # type: ignore[call-overload]
        if verdict.sqlite["integrity"] != "ok":
            verdict.corrupt_files.append("db.sqlite")
    verdict.totals = totals
    return verdict


def check_sqlite(files: Path, commits: list[int]) -> dict[str, object]:
    """Open the database as the next process would (rolling back a hot journal) and look for each commit."""
    db = files / "db.sqlite"
    if not db.is_file() or db.stat().st_size == 0:
        return {"integrity": "missing", "commits_acknowledged": len(commits), "commits_missing": len(commits)}
    try:
        con = sqlite3.connect(db)
        try:
            integrity = "; ".join(row[0] for row in con.execute("PRAGMA integrity_check"))
            present = {row[0] for row in con.execute("SELECT n FROM t")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return {"integrity": f"error: {exc}", "commits_acknowledged": len(commits), "commits_missing": len(commits)}
    missing = [n for n in commits if n not in present]
    return {
        "integrity": integrity,
        "commits_acknowledged": len(commits),
        "commits_missing": len(missing),
        "first_missing": missing[0] if missing else None,
    }
