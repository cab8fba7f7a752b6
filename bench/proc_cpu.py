"""CPU time from /proc: one process (all its threads), the kernel's own threads, and the whole machine.

What a server costs per request is its user+system CPU over a job divided by the requests it served; that
figure is stable on a loaded machine where throughput is not. Work can move out of the server into kernel
threads (page-cache writeback, AIO completion) or into interrupt time, so the machine's busy time is sampled
too, and the client's own CPU (from ``wait4``) is subtracted from it by the caller.

All figures are in seconds, read from clock ticks (``SC_CLK_TCK``, usually 100 per second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may contain spaces and parentheses)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()


def process_cpu(pid: int) -> float:
    """User+system CPU seconds of process ``pid``, all threads, living and ended (utime + stime)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def process_user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` apart, all threads, living and ended."""
    fields = _stat_fields(pid)
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def kernel_threads_cpu() -> dict[int, float]:
    """CPU seconds of every kernel thread alive now (kworkers doing writeback, ksoftirqd, ...), by pid."""
    threads = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat_fields(name)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if int(fields[6]) & PF_KTHREAD:
            threads[int(name)] = (int(fields[11]) + int(fields[12])) / TICK
    return threads


def machine_busy() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine since boot, all cores (user, nice, system, irq, softirq), and
    the interrupt part of it (irq + softirq: network receive, block completions) on its own."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / TICK, (irq + softirq) / TICK


@dataclass
class Sample:
    """A reading of the three clocks at one moment."""

    server: float
    kthreads: dict[int, float]
    machine: float
    interrupts: float

    @classmethod
    def take(cls, pid: int) -> Sample:
        return cls(process_cpu(pid), kernel_threads_cpu(), *machine_busy())

    def since(self, before: Sample) -> Usage:
        # Kernel threads alive at both moments (a worker that ended took its time with it; one that started
        # meanwhile counts from zero).
        kthreads = sum(max(cpu - before.kthreads.get(pid, 0.0), 0.0) for pid, cpu in self.kthreads.items())
        return Usage(
            self.server - before.server, kthreads, self.machine - before.machine, self.interrupts - before.interrupts
        )


@dataclass
class Usage:
    """CPU seconds used between two samples."""

    server: float
    kthreads: float
    machine: float
    interrupts: float

    @property
    def server_and_kernel(self) -> float:
        """The server plus the kernel's own work meanwhile (kernel threads, interrupts): what moves out of the
        server when it hands work to the kernel, without the other processes of a shared machine."""
        return self.server + self.kthreads + self.interrupts


def child_cpu(rusage: os.struct_rusage | object) -> float:
    """User+system seconds from a ``wait4`` rusage (the child and the descendants it waited for)."""
    return float(rusage.ru_utime + rusage.ru_stime)  # type: ignore[attr-defined]
