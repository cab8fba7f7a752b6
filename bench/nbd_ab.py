#!/usr/bin/env python3
"""A/B of two versions of ``cachemode serve`` on one fio job: server CPU per request, alternating.

On a loaded 2-core machine a change worth 10% of the server's CPU per request disappears in the run-to-run
noise unless the two versions run back to back, many times, and the medians are compared. Each run starts
``cachemode serve`` afresh from one source tree (``PYTHONPATH``: a ``git worktree``, or a ``git archive`` of a
commit unpacked somewhere, with its extensions built or copied in), syncs, and runs one fio job on the same
image (``bench/nbd_bench.py``'s jobs, no ramp); the server's user and system CPU come from ``/proc/PID/stat``.

    git archive HEAD~1 src | tar -x -C /tmp/before
    .venv/bin/python bench/nbd_ab.py --job randwrite-4k --pairs 7 /tmp/before/src src
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nbd_bench import JOBS, cost, fill_image, free_port, run_fio, server_command, unit, wait_port
from proc_cpu import process_user_system


def one(src: str, mode: str, image: str, job: tuple, runtime: int, tmp: str) -> dict[str, float]:
    """One run of ``job`` against a fresh server imported from ``src``."""
    name, rw, bs, depth = job
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    command = server_command("cachemode", mode, image, port)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        os.sync()
        user0, sys0 = process_user_system(proc.pid)
        run = run_fio(port, rw, bs, depth, runtime, os.path.getsize(image), tmp)
        user1, sys1 = process_user_system(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {
        "cpu": cost(name, user1 - user0 + sys1 - sys0, run),
        "user": cost(name, user1 - user0, run),
        "load": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="source tree A (the directory that holds the cachemode package)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--job", default="randread-4k", choices=[j[0] for j in JOBS])
    ap.add_argument("--mode", default="writeback")
    ap.add_argument("--pairs", type=int, default=5, help="A, B runs back to back, this many times")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    job = next(j for j in JOBS if j[0] == args.job)
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-ab-") as tmp:
        image = os.path.join(tmp, "bench.img")
        fill_image(image, args.size_mib << 20)
        for _ in range(args.pairs):
            for side, src in (("A", args.a), ("B", args.b)):
                r = one(src, args.mode, image, job, args.runtime, tmp)
                results[side].append(r)
                print(f"{side} cpu {r['cpu']:8.2f} user {r['user']:8.2f} {unit(args.job)}  load {r['load']:.2f}")
    print(f"{args.mode} {args.job}, {args.pairs} pairs of {args.runtime} s runs, medians ({unit(args.job)}):")
    for side, src in (("A", args.a), ("B", args.b)):
        rs = results[side]
        cpu = statistics.median(r["cpu"] for r in rs)
        user = statistics.median(r["user"] for r in rs)
        print(f"  {side} {src}: cpu {cpu:.2f} (user {user:.2f})")
    lower = sum(b["cpu"] < a["cpu"] for a, b in zip(results["A"], results["B"], strict=True))
    print(f"  B lower than A in {lower} of {args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
