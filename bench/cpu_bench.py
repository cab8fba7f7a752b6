"""CPU cache simulator benchmark: cachemode against pycachesim on the same hierarchy and the same trace.

Hierarchy (both simulators): L1 32 KiB 8-way 64 B, L2 1 MiB 16-way 64 B, LRU, write-back, write-allocate.
Workloads of --refs references (default 10M) of 8 bytes each:

- ``mm32``: Dinero IV's mm.32 trace (../shared/traces/mm32.din) repeated to length, if present;
- ``synthetic``: bursts (mean 32 references) drawn from a sequential sweep over 8 MiB, a 16 KiB hot region
  and uniform accesses over 4 MiB (40/30/30), with 25% stores in the mixed case.

For each: loads only (pycachesim's batch ``load``) and mixed loads/stores (its ``loadstore``, consecutive
loads and stores grouped into its (loads, stores) tuples). Timings are best of --repeat runs, interleaved;
pycachesim's time excludes building its Python lists. cachemode is timed on one core and on all cores
(set-partitioned, exact). Miss counts are printed next to each other as a sanity check (loads-only runs must
agree; with stores they differ slightly because pycachesim does not update LRU order on store hits).

Also: one level alone (L1), and ``cachemode dinero`` end to end on the synthetic mixed trace as extended din
(parse included, compiled kernels cached). Set DINEROIV=/path/to/dineroIV to time Dinero IV on the same file.

Usage: python bench/cpu_bench.py [--refs N] [--repeat R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cachemode.cpu import CacheConfig, Hierarchy, Level, Trace, simulate
from cachemode.cpu.trace import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
MM32 = ROOT.parent / "shared" / "traces" / "mm32.din"


def synthetic(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nb = n // 16 + 64  # bursts: twice as many as needed on average, then cut to n references
    lens = rng.geometric(1 / 32, nb)
    kinds = rng.choice(3, nb, p=[0.4, 0.3, 0.3])
    kind = np.repeat(kinds, lens)[:n]
    seq = (np.cumsum(kind == 0) * 8) % (8 << 20)
    hot = rng.integers(0, 2048, n) * 8
    far = rng.integers(0, 1 << 19, n) * 8
    return np.where(kind == 0, 0x10000000 + seq, np.where(kind == 1, 0x7FF00000 + hot, 0x20000000 + far)).astype(
        np.uint64
    )


def mm32(n: int) -> np.ndarray | None:
    if not MM32.exists():
        return None
    addrs = parse_bytes(MM32.read_bytes(), "din").addrs
    return np.tile(addrs, -(-n // len(addrs)))[:n]


def hierarchy() -> Hierarchy:
    return Hierarchy([Level(unified=CacheConfig("32k", 64, 8)), Level(unified=CacheConfig("1m", 64, 16))])


def pcs_hierarchy():
    from cachesim import Cache, CacheSimulator, MainMemory

    mem = MainMemory()
    l2 = Cache("L2", 1024, 16, 64, "LRU", write_back=True, write_allocate=True)
    mem.load_to(l2)
    mem.store_from(l2)
    l1 = Cache("L1", 64, 8, 64, "LRU", write_back=True, write_allocate=True, store_to=l2, load_from=l2)
    return CacheSimulator(l1, mem), l1, l2


def group_loadstore(addrs: np.ndarray, is_store: np.ndarray) -> list:
    """[(loads, stores), ...] preserving order: a run of loads then the run of stores after it."""
    out = []
    a = addrs.tolist()
    s = is_store.tolist()
    i, n = 0, len(a)
    while i < n:
        loads = []
        while i < n and not s[i]:
            loads.append(a[i])
            i += 1
        stores = []
        while i < n and s[i]:
            stores.append(a[i])
            i += 1
        out.append((loads, stores))
    return out


def best(fn, repeat: int):
    times, last = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t0)
    return min(times), last


def bench_workload(name: str, addrs: np.ndarray, stores: np.ndarray | None, repeat: int, threads: int) -> dict:
    n = len(addrs)
    types = np.zeros(n, np.int8) if stores is None else stores.astype(np.int8)
    trace = Trace(types, addrs, np.full(n, 8, np.uint16))
    h = hierarchy()
    simulate(h, trace.slice(0, 2000), threads=1)  # load compiled kernels
    if stores is None:
        lst = addrs.tolist()

        def run_pcs():
            cs, l1, l2 = pcs_hierarchy()
            cs.load(lst, length=8)
            return l1.stats()["MISS_count"], l2.stats()["MISS_count"]
    else:
        groups = group_loadstore(addrs, stores)

        def run_pcs():
            cs, l1, l2 = pcs_hierarchy()
            cs.loadstore(groups, length=8)
            return l1.stats()["MISS_count"], l2.stats()["MISS_count"]

    res = {}
    for _ in range(repeat):  # interleave the simulators so machine noise hits both alike
        for label, fn in (
            ("cachemode_1core", lambda: simulate(h, trace, threads=1)),
            ("cachemode_all", lambda: simulate(h, trace, threads=threads)),
            ("pycachesim", run_pcs),
        ):
            t, out = best(fn, 1)
            if label not in res or t < res[label][0]:
                res[label] = (t, out)
    cm = res["cachemode_1core"][1]
    row = {
        "workload": name,
        "mode": "loads" if stores is None else "loads+stores",
        "refs": n,
        "cachemode_1core_Mrefs_s": n / res["cachemode_1core"][0] / 1e6,
        "cachemode_all_cores_Mrefs_s": n / res["cachemode_all"][0] / 1e6,
        "pycachesim_Mrefs_s": n / res["pycachesim"][0] / 1e6,
        "cachemode_misses": [cm.caches[0].total_misses, cm.caches[1].total_misses],
        "pycachesim_misses": list(res["pycachesim"][1]),
    }
    row["ratio_1core"] = row["cachemode_1core_Mrefs_s"] / row["pycachesim_Mrefs_s"]
    row["ratio_all_cores"] = row["cachemode_all_cores_Mrefs_s"] / row["pycachesim_Mrefs_s"]
    return row


def one_level(addrs: np.ndarray, repeat: int, threads: int) -> dict:
    n = len(addrs)
    trace = Trace(np.zeros(n, np.int8), addrs, np.full(n, 8, np.uint16))
    cfg = CacheConfig("32k", 64, 8)
    simulate(cfg, trace.slice(0, 2000), threads=1)
    t1, _ = best(lambda: simulate(cfg, trace, threads=1), repeat)
    ta, _ = best(lambda: simulate(cfg, trace, threads=threads), repeat)
    return {"refs": n, "one_level_1core_Mrefs_s": n / t1 / 1e6, "one_level_all_cores_Mrefs_s": n / ta / 1e6}


DINERO_OPTS = "-l1-usize 32k -l1-ubsize 64 -l1-uassoc 8 -l2-usize 1m -l2-ubsize 64 -l2-uassoc 16 -informat D"


def dinero_end_to_end(addrs: np.ndarray, stores: np.ndarray, repeat: int) -> dict:
    letters = np.where(stores, "w", "r")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.xdin"
        with path.open("w") as f:
            step = 1 << 20
            for lo in range(0, len(addrs), step):
                chunk = zip(letters[lo : lo + step].tolist(), addrs[lo : lo + step].tolist(), strict=True)
                f.write("".join(f"{c} {a:x} 8\n" for c, a in chunk))
        opts = DINERO_OPTS.split()
        cmd = [sys.executable, "-m", "cachemode", "dinero", *opts]
        subprocess.run(cmd, input=b"r 0 8\n", capture_output=True, check=True)  # compiled kernels cached

        def run(c):
            with path.open("rb") as f:
                p = subprocess.run(c, stdin=f, capture_output=True, check=True)
            return p.stdout

        t, out = best(lambda: run(cmd), repeat)
        row = {"refs": len(addrs), "trace_bytes": path.stat().st_size, "cachemode_dinero_wall_s": t}
        if os.environ.get("DINEROIV"):
            td, ref = best(lambda: run([os.environ["DINEROIV"], *opts]), 1)
            row["dineroIV_wall_s"] = td
            row["reports_identical"] = out == ref
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cpu_bench.json"))
    ap.add_argument("--no-dinero", action="store_true", help="skip the cachemode dinero end-to-end run")
    args = ap.parse_args()
    n = args.refs
    rng = np.random.default_rng(2)
    stores = rng.random(n) < 0.25
    workloads = [("synthetic", synthetic(n))]
    mm = mm32(n)
    if mm is not None:
        workloads.insert(0, ("mm32", mm))
    else:
        print(f"note: {MM32} not found; synthetic workload only", file=sys.stderr)
    print(f"cpu_bench: {n:,} refs, {os.cpu_count()} cores, best of {args.repeat}; L1 32K/8-way/64B + L2 1M/16-way/64B")
    rows = []
    for name, addrs in workloads:
        for st in (None, stores):
            row = bench_workload(name, addrs, st, args.repeat, args.threads)
            rows.append(row)
            print(
                f"{name:9s} {row['mode']:12s} cachemode {row['cachemode_1core_Mrefs_s']:7.1f} M/s (1 core) "
                f"{row['cachemode_all_cores_Mrefs_s']:7.1f} M/s (all)  "
                f"pycachesim {row['pycachesim_Mrefs_s']:6.1f} M/s  "
                f"ratio {row['ratio_1core']:.2f}x / {row['ratio_all_cores']:.2f}x  "
                f"misses L1/L2 {row['cachemode_misses']} vs {row['pycachesim_misses']}"
            )
    one = one_level(workloads[0][1], args.repeat, args.threads)
    print(
        f"one level (L1 only, {workloads[0][0]} loads): {one['one_level_1core_Mrefs_s']:.1f} M/s (1 core), "
        f"{one['one_level_all_cores_Mrefs_s']:.1f} M/s (all cores)"
    )
    out = {"rows": rows, "one_level": one, "cores": os.cpu_count()}
    if not args.no_dinero:
        d = dinero_end_to_end(workloads[-1][1], stores, min(args.repeat, 2))
        out["dinero"] = d
        extra = (
            f", dineroIV {d['dineroIV_wall_s']:.2f} s (identical: {d['reports_identical']})"
            if "dineroIV_wall_s" in d
            else ""
        )
        mb = d["trace_bytes"] / 1e6
        wall = d["cachemode_dinero_wall_s"]
        print(f"cachemode dinero end to end ({d['refs']:,} refs, {mb:.0f} MB xdin): {wall:.2f} s{extra}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
