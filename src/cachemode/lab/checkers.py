"""Built-in crash-state checkers, chosen by name: ``crash explore --check ext4``.

A name is told apart from a command by ``{image}``: a command must say where the state's image goes, a
built-in name never does. ``ext4`` checks a crash state the way the next boot would see it: the journal is
replayed first (``e2fsck -y -E journal_only``), then ``e2fsck -fn`` checks what the replay left. Running
``e2fsck -fn`` (or ``fsck.ext4 -n``) alone skips the journal and judges the filesystem as it was before the
journalled transactions, which fails states that are perfectly consistent.
"""

from __future__ import annotations

import shutil
import subprocess

from cachemode.lab.explore import Checker, CommandChecker, CrashState, ExploreError, Outcome


def ext4_replay_and_check(image: str, timeout: float = 60.0) -> Outcome:
    """Replay ext4's journal on ``image`` (it is written to), then ``e2fsck -fn``; passes when that is clean."""
    try:
        replay = subprocess.run(
            ["e2fsck", "-y", "-E", "journal_only", image], capture_output=True, text=True, timeout=timeout
        )
        if replay.returncode not in (0, 1, 2):  # 1, 2: the replay changed the filesystem, as it should
            out = (replay.stdout + replay.stderr).strip()
            return Outcome(False, f"journal replay: exit status {replay.returncode}: {out[-2000:]}", ("journal",))
        check = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"e2fsck timed out after {timeout} s", ("timeout",))
    out = (check.stdout + check.stderr).strip()
    if check.returncode == 0:
        return Outcome(True, out)
    return Outcome(False, f"e2fsck -fn: exit status {check.returncode}: {out[-2000:]}", ("fsck",))


class Ext4Checker(Checker):
    """``--check ext4``: journal replay, then a forced read-only e2fsck, on each state's scratch image.

    e2fsck must exist where the states are checked (here, or on every worker of a cluster): :meth:`verify`.
    """

    name = "ext4"

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def describe(self) -> str:
        return "ext4 (journal replay, then e2fsck -fn)"

    def verify(self) -> str | None:
        if shutil.which("e2fsck") is None:
            return "--check ext4 needs e2fsck: install e2fsprogs (apt-get install e2fsprogs)"
        return None

    def check_file(self, path: str, state: CrashState) -> Outcome:
        return ext4_replay_and_check(path, self.timeout)


BUILTIN_CHECKERS = {"ext4": Ext4Checker}


def resolve_checker(spec: str, timeout: float = 60.0) -> CommandChecker | Ext4Checker:
    """A built-in checker by name, or a command (which must contain ``{image}``)."""
    if "{image}" in spec:
        return CommandChecker(spec, timeout=timeout)
    if spec in BUILTIN_CHECKERS:
        return BUILTIN_CHECKERS[spec](timeout=timeout)
    names = ", ".join(sorted(BUILTIN_CHECKERS))
    raise ExploreError(
        f"--check {spec!r} is not a built-in checker ({names}); a command must contain {{image}}, where the "
        "crash state's image goes"
    )
