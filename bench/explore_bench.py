"""Crash exploration: state-building time and states checked per second, here and on a Dask cluster.

Generates the log issue 9 describes: qemu-io writes ``--writes`` WRITEs of ``--length`` (a FLUSH after every
``--flush-every``) on a ``--disk`` lab disk through ``cachemode serve --lab --record``, then aborts (a guest
crash). Then ``explore`` (the library call ``crash explore`` makes) builds ``--states`` states at 512-byte sectors
and checks them with ``--check`` (default ``sha256sum``, which reads the whole image: a stand-in for a checker
such as e2fsck that takes tens of milliseconds), locally with 1 and 2 jobs and on Dask clusters of 1 and 2 worker
processes (``LocalCluster``; ``--scheduler ADDRESS`` adds a cluster you already run).

Prints wall and CPU seconds for building (CPU time of the build alone, measured apart from checking, is the
figure that does not depend on other load), states/s for checking, and the load average before and after.

    .venv/bin/python bench/explore_bench.py [--states 500] [--seed 5] [--check 'sha256sum {image}']
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cachemode.execution import open_executor
from cachemode.lab.explore import CommandChecker, CrashModel, explore, generate
from cachemode.lab.record import read_log
from cachemode.lab.states import StateBuilder
from cachemode.modes import get_mode
from cachemode.units import parse_size


def record_log(directory: Path, writes: int, length: str, flush_every: int, disk: str, seed: int) -> Path:
    """Record the qemu-io workload through ``cachemode serve --lab --record``; returns the log's path."""
    if shutil.which("qemu-io") is None:
        sys.exit("qemu-io (qemu-utils) is needed to record the benchmark's log")
    image, sock, log = directory / "lab.img", directory / "nbd.sock", directory / "w.log"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cachemode",
            "serve",
            str(image),
            "--create",
            disk,
            "--cache",
            "writeback",
            "--socket",
            str(sock),
            "--lab",
            "--record",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if serve.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"cachemode serve did not start: {serve.stderr.read().decode() if serve.stderr else ''}")
            time.sleep(0.05)
        rng = random.Random(seed)
        size, wlen = parse_size(disk), parse_size(length)
        cmds: list[str] = []
        for i in range(writes):
            offset = rng.randrange(0, size - wlen + 1, 4096)
            cmds += ["-c", f"write -P {(i * 7 + 1) % 256} {offset} {wlen}"]
            if flush_every and i % flush_every == flush_every - 1:
                cmds += ["-c", "flush"]
        cmds += ["-c", "abort"]  # a guest crash: no FLUSH at close
        subprocess.run(
            ["qemu-io", "-f", "raw", "-t", "writeback", *cmds, f"nbd+unix:///?socket={sock}"],
            capture_output=True,
            check=False,
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    return log


def build_cpu_seconds(log_path: Path, states: int, seed: int) -> tuple[float, int]:
    """CPU seconds to generate, build and de-duplicate the states (no checking), and how many are distinct."""
    log = read_log(log_path)
    zeros = bytes(log.size)
    t0 = time.process_time()
    model = CrashModel(log, get_mode("writeback"))
    builder = StateBuilder(log, 512, lambda n, o: zeros[o : o + n])
    distinct = sum(
        builder.build(s.durable, s.kept, s.torn) is not None for s in generate(model, states, random.Random(seed), 512)
    )
    return time.process_time() - t0, distinct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=100)
    ap.add_argument("--length", default="128k")
    ap.add_argument("--flush-every", type=int, default=10)
    ap.add_argument("--disk", default="32M")
    ap.add_argument("--states", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--check", default="sha256sum {image}")
    ap.add_argument("--scheduler", default=None, help="Also run on the Dask cluster at this address.")
    ap.add_argument("--workers", default="1,2", help="Comma-separated job / worker counts to measure.")
    ap.add_argument("--log", default=None, help="Use this recorded log instead of recording one (needs no qemu-io).")
    ap.add_argument("--save-log", default=None, help="Keep a copy of the recorded log here.")
    args = ap.parse_args()
    args.workers = [int(n) for n in args.workers.split(",")]
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="explore-bench-") as tmp:
        directory = Path(tmp)
        if args.log:
            log_path = Path(args.log)
        else:
            log_path = record_log(directory, args.writes, args.length, args.flush_every, args.disk, args.seed)
            if args.save_log:
                shutil.copyfile(log_path, args.save_log)
        log = read_log(log_path)
        base = directory / "base.img"
        with open(base, "wb") as f:
            f.truncate(log.size)
        print(
            f"log: {len(log.entries)} entries, {log.writes} writes, {log.flushes} flushes, "
            f"{sum(e.length for e in log.entries if e.is_write) / 1e6:.1f} MB written, disk {log.size >> 20} MiB"
        )
        cpu, distinct = build_cpu_seconds(log_path, args.states, args.seed)
        print(f"build only: {args.states} states ({distinct} distinct) in {cpu:.3f} CPU s")
        runs: list[tuple[str, int, str | None]] = [("local threads", n, None) for n in args.workers]
        runs += [("dask LocalCluster", n, "local") for n in args.workers]
        if args.scheduler:
            runs.append((f"dask {args.scheduler}", 0, args.scheduler))
        checker = CommandChecker(args.check)
        print("\n| where | workers | prepare_seconds (wall) | checked | states/s | materialised |")
        print("|---|---|---|---|---|---|")
        for label, jobs, scheduler in runs:
            with open_executor(jobs or None, scheduler) as ex:
                report = explore(
                    log, get_mode("writeback"), base=str(base), checker=checker, states=args.states, seed=args.seed,
                    executor=ex,
                )  # fmt: skip
                workers = ex.workers
            rate = report.checked / report.seconds if report.seconds else float("inf")
            print(
                f"| {label} | {workers} | {report.prepare_seconds:.2f} | {report.checked} | {rate:.1f} "
                f"| {report.materialise} |",
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
