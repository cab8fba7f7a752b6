#!/usr/bin/env python3
"""A/B of two versions of ``cachemode serve`` over successive passes of 1 MiB writes across the same image.

A time-based fio job over a small image rewrites it many times a second, so most of its WRITEs land on pages
that are still dirty from the last pass; a guest streaming new data writes each page once. What a write path
costs can depend on which it is (the mapped path of ``_batch.splice_writes`` receives a payload straight into
the image only over dirty pages, and pays a page fault per 4 KiB the first time after they were written some
other way). So this runs, per round and tree: a fresh server, ``sync`` (every page of the image clean), then
``--passes`` single passes of fio's sequential 1 MiB writes at queue depth 4 over the whole image, and reports
the server's CPU per GiB for each pass, medians over the rounds (A and B alternating, ABBA).

    git archive HEAD~1 src | tar -x -C /tmp/before
    .venv/bin/python bench/nbd_passes.py --rounds 4 /tmp/before/src src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from nbd_ab import serving
from nbd_bench import fill_image, fio_uri
from proc_cpu import process_user_system


def one_round(src: str, mode: str, image: str, passes: int, tmp: str) -> list[float]:
    """Server CPU (ms per GiB) of each pass, against a fresh server imported from ``src``."""
    costs = []
    size = os.path.getsize(image)
    out = os.path.join(tmp, "fio.json")
    with serving(src, mode, image, tmp) as (where, pid):
        for _ in range(passes):
            user0, sys0 = process_user_system(pid)
            subprocess.run(
                ["fio", "--name=pass", "--ioengine=nbd", f"--uri={fio_uri(where, False)}", "--rw=write", "--bs=1m",
                 "--iodepth=4", f"--size={size}", f"--io_size={size}", "--output-format=json", f"--output={out}"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            user1, sys1 = process_user_system(pid)
            text = Path(out).read_text()
            written = json.loads(text[text.index("{") :])["jobs"][0]["write"]["io_bytes"]
            costs.append((user1 - user0 + sys1 - sys0) * 1e3 / (written / (1 << 30)))
    return costs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="source tree A (the directory that holds the cachemode package)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--mode", default="writeback")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per tree, alternating")
    ap.add_argument("--passes", type=int, default=3, help="passes over the image per round")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    results: dict[str, list[list[float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-passes-") as tmp:
        image = os.path.join(tmp, "bench.img")
        fill_image(image, args.size_mib << 20)
        sides = (("A", args.a), ("B", args.b))
        for rnd in range(args.rounds):
            for side, src in sides if rnd % 2 == 0 else sides[::-1]:
                costs = one_round(src, args.mode, image, args.passes, tmp)
                results[side].append(costs)
                print(f"{side} " + "  ".join(f"pass {i + 1} {c:6.1f}" for i, c in enumerate(costs)) + " ms/GiB")
    what = f"{args.rounds} rounds of {args.passes} passes of 1 MiB writes over the image"
    print(f"{args.mode}, {what}, medians of the server's CPU (ms/GiB):")
    for side, src in sides:
        medians = [statistics.median(r[i] for r in results[side]) for i in range(args.passes)]
        print(f"  {side} {src}: " + "  ".join(f"pass {i + 1} {m:.1f}" for i, m in enumerate(medians)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
