"""A booted guest: its initramfs, the QEMU process, and the ``cm:`` lines read from its serial console.

Every boot has a hard deadline: a guest that has not said what it was asked to say by then is killed and
reported, never waited for. Killing is always SIGKILL: a QEMU that exits cleanly flushes its drives, and a
power cut must not be preceded by one.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cachemode.vm import VmError
from cachemode.vm.initramfs import Initramfs, static_busybox
from cachemode.vm.kernel import BLOCK_MODULES, WANTED_MODULES, GuestKernel
from cachemode.vm.workloads import INIT, ROLES, Workload

_EXITED = object()


def build_initramfs(
    kernel: GuestKernel,
    path: Path,
    *,
    workload: Workload | None = None,
    programs: Sequence[str] = (),
    nbd_client: bool = False,
) -> int:
    """Write the initramfs every role of this run boots from; returns its size in bytes."""
    ram = Initramfs()
    for directory in ("proc", "sys", "dev", "mnt", "tmp", "bin", "sbin", "usr/bin", "usr/sbin"):
        ram.add_dir(directory)
    ram.add_host_file("bin/busybox", static_busybox(), 0o755)
    ram.add_file("init", INIT.encode(), 0o755)
    for role, script in ROLES.items():
        ram.add_file(f"etc/roles/{role}.sh", script.encode())
    ram.add_file("etc/cm-role.sh", b'. "/etc/roles/$CM_role.sh"\n')
    ram.add_file("etc/cm-workload.sh", (workload.script if workload else "").encode())
    wanted = [*BLOCK_MODULES, *(WANTED_MODULES if nbd_client else ())]
    order = kernel.load_order(wanted)
    for ko in order:
        ram.add_host_file(f"lib/modules/{ko.name}", ko, 0o644)
    ram.add_file("etc/cm-modules", "".join(f"{ko.name}\n" for ko in order).encode())
    wanted_programs = [*(workload.programs if workload else ()), *programs, *(("nbd-client",) if nbd_client else ())]
    for program in dict.fromkeys(wanted_programs):
        if program == "nbd-client" and shutil.which(program) is None:
            raise VmError("nbd-client not found: install nbd-client (apt-get install nbd-client)")
        ram.add_program(program)
    return ram.write(path)


class Guest:
    """A running QEMU whose serial console is read line by line in a thread."""

    def __init__(self, argv: list[str], *, console_log: Path | None = None) -> None:
        self.argv = argv
        self.console: list[str] = []
        self.events: list[str] = []  # the "cm: ..." lines, without the prefix
        self._lines: queue.Queue[object] = queue.Queue()
        self._log = open(console_log, "w") if console_log is not None else None  # noqa: SIM115 (closed in kill)
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                encoding="utf-8",
                errors="replace",  # a console may carry any byte; never let decoding stop the reader
                bufsize=1,
            )
        except OSError as exc:
            raise VmError(f"cannot start {argv[0]}: {exc.strerror}") from None
        self._reader = threading.Thread(target=self._read, name="guest-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\r\n").replace("\r", "")
            self.console.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
            self._lines.put(line)
        self._lines.put(_EXITED)

    def read_until(self, stop: Callable[[str], bool], timeout: float) -> str:
        """Collect ``cm:`` lines until ``stop(event)`` holds; returns that event. Errors, exits, timeouts raise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                item = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                self.kill()
                raise VmError(f"the guest did not finish in {timeout:.0f} s (killed); {self._tail()}") from None
            if item is _EXITED:
                self.proc.wait()
                raise VmError(f"QEMU exited (status {self.proc.returncode}) early; {self._tail()}")
            line = str(item)
            at = line.find("cm: ")
            if at < 0:
                continue
            event = line[at + 4 :].strip()
            self.events.append(event)
            if event.startswith("error "):
                self.kill()
                raise VmError(f"the guest reported: {event[6:]}")
            if stop(event):
                return event

    def _tail(self) -> str:
        tail = [ln for ln in self.console if ln.strip()][-3:]
        return "last console lines: " + " | ".join(tail) if tail else "no console output"

    def kill(self) -> None:
        """SIGKILL: nothing QEMU holds is flushed (a clean exit would flush its drive)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._reader.join(timeout=5)
            self._log.close()
            self._log = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
