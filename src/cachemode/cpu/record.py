"""Record a real program's memory trace with ``valgrind --tool=lackey --trace-mem=yes``, streaming.

Valgrind writes lackey's lines to a pipe that is parsed and written out chunk by chunk, so a long recording
needs no more memory than a short one (except into ``.npz``, which is written whole). The program keeps its
own standard input, output and error, as under ``time`` or ``strace``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from cachemode.cpu.trace import TraceReader
from cachemode.cpu.writer import TraceWriter
from cachemode.errors import CachemodeError


class RecordError(CachemodeError):
    """Recording could not start or produced no trace."""


def record(cmd: list[str], output: str, valgrind: str = "valgrind") -> tuple[int, int, str]:
    """Run ``cmd`` under lackey, writing its references to ``output`` (format by suffix, see
    :mod:`cachemode.cpu.writer`). Returns (references written, or lines for ``.lackey``; the program's exit
    status; the format written)."""
    if not cmd:
        raise RecordError("no command given to record (use: cachemode trace record -o FILE -- CMD ...)")
    exe = shutil.which(valgrind)
    if exe is None:
        raise RecordError(f"{valgrind} not found; install valgrind to record traces")
    if shutil.which(cmd[0]) is None:
        raise RecordError(f"{cmd[0]}: command not found")
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen([exe, "--tool=lackey", "--trace-mem=yes", f"--log-fd={wfd}", *cmd], pass_fds=(wfd,))
    except OSError as exc:
        os.close(rfd)
        raise RecordError(f"cannot run valgrind: {exc}") from None
    finally:
        os.close(wfd)
    refs = 0
    try:
        with os.fdopen(rfd, "rb") as pipe, TraceWriter(output) as out:
            if out.kind == "lackey":
                while block := pipe.read(1 << 20):
                    out.write_raw(block)
                    refs += block.count(b"\n")
            else:
                for chunk in TraceReader(pipe, "lackey", name=f"valgrind output for {cmd[0]}"):
                    out.write(chunk)
                    refs += len(chunk)
            kind = out.kind
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    status = proc.wait()
    if refs == 0:
        raise RecordError(f"valgrind produced no trace for {cmd[0]!r} (exit status {status})")
    return refs, status, kind
