"""Record a real program's memory trace with ``valgrind --tool=lackey --trace-mem=yes``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cachemode.cpu.trace import Trace, parse_text
from cachemode.errors import CachemodeError


class RecordError(CachemodeError):
    """Recording could not start or produced no trace."""


def record(cmd: list[str], valgrind: str = "valgrind") -> tuple[Trace, int, bytes]:
    """Run ``cmd`` under lackey; returns (trace, the program's exit status, raw lackey text)."""
    if not cmd:
        raise RecordError("no command given to record (use: cachemode trace record -o FILE -- CMD ...)")
    exe = shutil.which(valgrind)
    if exe is None:
        raise RecordError(f"{valgrind} not found; install valgrind to record traces")
    with tempfile.TemporaryDirectory(prefix="cachemode-lackey-") as tmp:
        log = Path(tmp) / "trace.lackey"
        try:
            proc = subprocess.run(
                [exe, "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", *cmd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        except OSError as exc:
            raise RecordError(f"cannot run valgrind: {exc}") from None
        if not log.exists() or log.stat().st_size == 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RecordError(f"valgrind produced no trace for {cmd[0]!r}: {err[-1] if err else 'no output'}")
        raw = log.read_bytes()
    if b"--trace-mem" not in raw[:4096] and b"Lackey" not in raw[:4096] and proc.returncode == 1:
        raise RecordError(f"valgrind failed to run {cmd[0]!r}")
    trace = parse_text(raw, "lackey", os.fspath(log.name))
    return trace, proc.returncode, raw


def write_trace(trace: Trace, raw: bytes, path: str) -> str:
    """Write by suffix: ``.lackey`` raw lackey text, ``.npz`` compact, ``.bin`` Dinero binary, else extended din."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".lackey":
            Path(path).write_bytes(raw)
            return "lackey"
        if suffix == ".npz":
            trace.save(path)
            return "npz"
        if suffix == ".bin":
            Path(path).write_bytes(trace.to_binary())
            return "bin"
        Path(path).write_text(trace.to_xdin())
        return "xdin"
    except OSError as exc:
        raise RecordError(f"{path}: cannot write trace: {exc.strerror or exc}") from None
