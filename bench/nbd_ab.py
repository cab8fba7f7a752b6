#!/usr/bin/env python3
"""A/B of two versions of ``cachemode serve`` on one fio job: server CPU per request, alternating (ABBA).

On a loaded 2-core machine a change worth 10% of the server's CPU per request disappears in the run-to-run
noise unless the two versions run back to back, many times, and the medians are compared. Each run starts
``cachemode serve`` afresh from one source tree (``PYTHONPATH``: a ``git worktree``, or a ``git archive`` of a
commit unpacked somewhere, with its extensions built or copied in), syncs, and runs one fio job on the same
image (``bench/nbd_bench.py``'s jobs, no ramp); the server's user and system CPU come from ``/proc/PID/stat``.

    git archive HEAD~1 src | tar -x -C /tmp/before
    .venv/bin/python bench/nbd_ab.py --job randwrite-4k --pairs 7 /tmp/before/src src

``--job randrw-mixed`` is a guest's mix rather than one kind of request: 70% reads, 80% of requests 4 KiB and
20% 1 MiB, random, queue depth 16 (CPU per request). Its 1 MiB writes leave dirty pages whose writeback makes
the next run slower, so give it ``--fresh-image`` (any job may use it): every run then starts on a fresh copy
of the filled image. ``--rate-iops`` holds fio to a fixed rate.

    .venv/bin/python bench/nbd_ab.py --job randrw-mixed --fresh-image --size-mib 256 --pairs 6 /tmp/before/src src
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nbd_bench import (
    JOBS,
    Endpoint,
    cost,
    fill_image,
    free_endpoint,
    run_fio,
    server_command,
    unit,
    wait_listening,
)
from proc_cpu import process_user_system

MIXED = ("randrw-mixed", "randrw", "4k", 16)
"""A guest's mix (see the module's docstring); fio's options for it are MIXED_FIO."""
MIXED_FIO = ("--rwmixread=70", "--bssplit=4k/80:1m/20")


@contextlib.contextmanager
def serving(src: str, mode: str, image: str, tmp: str, unix: bool = False) -> Iterator[tuple[Endpoint, int]]:
    """A fresh ``cachemode serve`` of ``image`` imported from ``src``, listening, the page cache synced:
    (where it listens, its pid); stopped with SIGTERM at the end."""
    where = free_endpoint(unix, tmp)
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    command = server_command("cachemode", mode, image, where)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(where, proc)
        os.sync()
        yield where, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def one(
    src: str, mode: str, image: str, job: tuple, runtime: int, tmp: str, rate_iops: int = 0, unix: bool = False
) -> dict[str, float]:
    """One run of ``job`` against a fresh server imported from ``src`` (on a Unix socket with ``unix``)."""
    name, rw, bs, depth = job
    extra = MIXED_FIO if job == MIXED else ()
    with serving(src, mode, image, tmp, unix) as (where, pid):
        user0, sys0 = process_user_system(pid)
        run = run_fio(where, rw, bs, depth, runtime, os.path.getsize(image), tmp, False, rate_iops, extra)
        user1, sys1 = process_user_system(pid)
    return {
        "cpu": cost(name, user1 - user0 + sys1 - sys0, run),
        "user": cost(name, user1 - user0, run),
        "iops": run["iops"],
        "load": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="source tree A (the directory that holds the cachemode package)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--job", default="randread-4k", choices=[j[0] for j in (*JOBS, MIXED)])
    ap.add_argument("--mode", default="writeback")
    ap.add_argument("--pairs", type=int, default=5, help="A, B runs back to back, this many times")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rate-iops", type=int, default=0, help="hold fio to this many requests a second")
    ap.add_argument("--fresh-image", action="store_true", help="every run on a fresh copy of the filled image")
    ap.add_argument("--unix", action="store_true", help="serve on a Unix socket instead of loopback TCP")
    args = ap.parse_args()
    job = next(j for j in (*JOBS, MIXED) if j[0] == args.job)
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-ab-") as tmp:
        template = os.path.join(tmp, "filled.img")
        fill_image(template, args.size_mib << 20)
        image = os.path.join(tmp, "bench.img")
        shutil.copyfile(template, image)
        for pair in range(args.pairs):
            # A then B, then B then A: whichever runs second in a pair may inherit the first one's state
            # (writeback, the CPU's clock), so the order alternates and that cancels out over the pairs.
            sides = (("A", args.a), ("B", args.b))
            for side, src in sides if pair % 2 == 0 else sides[::-1]:
                if args.fresh_image:
                    shutil.copyfile(template, image)
                r = one(src, args.mode, image, job, args.runtime, tmp, args.rate_iops, args.unix)
                results[side].append(r)
                print(
                    f"{side} cpu {r['cpu']:8.2f} user {r['user']:8.2f} {unit(args.job)}  {r['iops']:9.0f} req/s"
                    f"  load {r['load']:.2f}"
                )
    over = "a Unix socket" if args.unix else "loopback TCP"
    runs = f"{args.pairs} pairs of {args.runtime} s runs"
    print(f"{args.mode} {args.job} over {over}, {runs}, medians ({unit(args.job)}):")
    for side, src in (("A", args.a), ("B", args.b)):
        rs = results[side]
        cpu = statistics.median(r["cpu"] for r in rs)
        user = statistics.median(r["user"] for r in rs)
        rate = statistics.median(r["iops"] for r in rs)
        print(f"  {side} {src}: cpu {cpu:.2f} (user {user:.2f}) at {rate:.0f} req/s")
    lower = sum(b["cpu"] < a["cpu"] for a, b in zip(results["A"], results["B"], strict=True))
    print(f"  B lower than A in {lower} of {args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
