"""CPU cache simulator benchmark: cachemode beside pycachesim and Dinero IV, in one run, ratios printed.

Hierarchy (every simulator): L1 32 KiB 8-way 64 B, L2 1 MiB 16-way 64 B, LRU, write-back, write-allocate
(split into 32 KiB instruction and data caches for Dinero-format traces with instruction fetches).

Workloads of --refs references (default 10M):
- ``mm32``: Dinero IV's mm.32 trace (../shared/traces/mm32.din) repeated to length;
- ``miss-heavy``: bursts (mean 32 references) from a sequential sweep over 8 MiB, a 16 KiB hot region and
  uniform accesses over 4 MiB (40/30/30), 8-byte references; 44% of them miss L1 and 65% of those miss L2.

Measured, each with CPU time (``time.process_time`` in process; ``wait4`` rusage for programs) beside wall
time, since the machine may be shared (the load average is printed before and after); the best of --repeat
runs, cachemode and its peer taking turns:
1. throughput on one core, loads only (pycachesim's batch ``load``) and loads+stores (its ``loadstore``), on both
   workloads, against pycachesim 0.3.1 in the same process; cachemode on every core beside, by wall time;
2. one level (L1 alone) and 3C classification (split L1 with ccc on the data cache, unified L2 with ccc, on
   mm32 with its instruction fetches);
3. ``cachemode dinero`` end to end against ``dineroIV`` (DINEROIV=/path/to/dineroIV; built from its public
   source, never part of this repository) on mm32 x 40 as din (10.6M references) and on the miss-heavy trace as
   extended din, warm (Python's bytecode cached in a ``PYTHONPYCACHEPREFIX`` of the run's own, even where
   ``PYTHONDONTWRITEBYTECODE`` is set); reports compared from "Simulation complete" on;
4. the fixed cost of a 1,000-reference run (warm, as above), and a first run with every module compiled afresh
   (an empty ``PYTHONPYCACHEPREFIX``, as after installing), on mm32.

Usage: python bench/cpu_bench.py [--refs N] [--repeat R] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: its BLAS threads would spin beside the runs

import numpy as np

from cachemode.cpu import CacheConfig, Hierarchy, Level, Trace, simulate
from cachemode.cpu.trace import parse_bytes
from cachemode.cpu.writer import TraceWriter

ROOT = Path(__file__).resolve().parents[1]
MM32 = ROOT.parent / "shared" / "traces" / "mm32.din"
CM = [sys.executable, "-m", "cachemode"]
L2 = ["-l2-usize", "1m", "-l2-ubsize", "64", "-l2-uassoc", "16"]
DINERO_SPLIT = ["-l1-isize", "32k", "-l1-ibsize", "64", "-l1-iassoc", "8", "-l1-dsize", "32k", "-l1-dbsize", "64",
                "-l1-dassoc", "8", *L2]  # fmt: skip
DINERO_UNIFIED = ["-l1-usize", "32k", "-l1-ubsize", "64", "-l1-uassoc", "8", *L2]


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "pycachesim": importlib.metadata.version("pycachesim"),
        "cachemode": importlib.metadata.version("cachemode"),
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def miss_heavy(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nb = n // 16 + 64  # bursts: twice as many as needed on average, then cut to n references
    kind = np.repeat(rng.choice(3, nb, p=[0.4, 0.3, 0.3]), rng.geometric(1 / 32, nb))[:n]
    seq = (np.cumsum(kind == 0) * 8) % (8 << 20)
    hot = rng.integers(0, 2048, n) * 8
    far = rng.integers(0, 1 << 19, n) * 8
    addrs = np.where(kind == 0, 0x10000000 + seq, np.where(kind == 1, 0x7FF00000 + hot, 0x20000000 + far))
    return addrs.astype(np.uint64)


def mm32_trace() -> Trace:
    return parse_bytes(MM32.read_bytes(), "din", str(MM32))


def repeat_to(trace: Trace, n: int) -> Trace:
    reps = -(-n // len(trace))
    return Trace(*(np.tile(getattr(trace, f), reps)[:n] for f in ("types", "addrs", "sizes")))


def two_level(ccc: bool = False, split: bool = False) -> Hierarchy:
    l1 = CacheConfig("32k", 64, 8)
    l1d = CacheConfig("32k", 64, 8, ccc=ccc)
    first = Level(icache=l1, dcache=l1d) if split else Level(unified=l1d)
    return Hierarchy([first, Level(unified=CacheConfig("1m", 64, 16, ccc=ccc))])


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
    a, s = addrs.tolist(), is_store.tolist()
    i, n = 0, len(a)
    while i < n:
        j = i
        while j < n and not s[j]:
            j += 1
        k = j
        while k < n and s[k]:
            k += 1
        out.append((a[i:j], a[j:k]))
        i = k
    return out


def timed(fn, repeat: int):
    """(best CPU seconds, best wall seconds, last result)."""
    return timed_side_by_side([fn], repeat)[0]


def timed_side_by_side(fns: list, repeat: int) -> list:
    """[(best CPU seconds, best wall seconds, last result)] of each function, run in turns (one of each, repeat
    times), so that a burst of load on the shared machine falls on all of them alike rather than on one."""
    cpu: list[list[float]] = [[] for _ in fns]
    wall: list[list[float]] = [[] for _ in fns]
    out: list = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            c0, w0 = time.process_time(), time.perf_counter()
            out[i] = fn()
            cpu[i].append(time.process_time() - c0)
            wall[i].append(time.perf_counter() - w0)
    return [(min(c), min(w), o) for c, w, o in zip(cpu, wall, out, strict=True)]


def throughput(name: str, addrs: np.ndarray, stores: np.ndarray | None, repeat: int) -> dict:
    n = len(addrs)
    types = np.zeros(n, np.int8) if stores is None else stores.astype(np.int8)
    trace = Trace(types, addrs, np.full(n, 8, np.uint16))
    h = two_level()
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

    (cm_cpu, cm_wall, res), (_, all_wall, _), (pcs_cpu, pcs_wall, pcs) = timed_side_by_side(
        [lambda: simulate(h, trace, threads=1), lambda: simulate(h, trace), run_pcs], repeat
    )
    return {
        "workload": name,
        "mode": "loads" if stores is None else "loads+stores",
        "refs": n,
        "cachemode_1core_Mrefs_per_cpu_s": n / cm_cpu / 1e6,
        "cachemode_1core_Mrefs_per_wall_s": n / cm_wall / 1e6,
        "cachemode_all_cores_Mrefs_per_wall_s": n / all_wall / 1e6,
        "pycachesim_Mrefs_per_cpu_s": n / pcs_cpu / 1e6,
        "pycachesim_Mrefs_per_wall_s": n / pcs_wall / 1e6,
        "ratio_cpu": pcs_cpu / cm_cpu,
        "cachemode_misses": [res.caches[0].total_misses, res.caches[1].total_misses],
        "pycachesim_misses": list(pcs),
    }


TIME = "/usr/bin/time"  # GNU time: a small parent, so the peak RSS is the program's own (Debian package time)


def run_program(cmd: list[str], stdin_path: Path | None, env: dict | None = None) -> tuple[bytes, float, float, int]:
    """(stdout, wall s, CPU s, peak RSS KiB or 0) of one run of a program.

    The peak comes from GNU time when it is installed: a child forked from this (large) process would report
    this process's resident size as its own peak."""
    with open(stdin_path or os.devnull, "rb") as f, tempfile.NamedTemporaryFile() as out, \
            tempfile.NamedTemporaryFile("r") as rss:  # fmt: skip
        wrapped = [TIME, "-f", "%M", "-o", rss.name, *cmd] if os.path.exists(TIME) else cmd
        w0 = time.perf_counter()
        p = subprocess.Popen(wrapped, stdin=f, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - w0
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{cmd[0]} exited with {os.waitstatus_to_exitcode(status)}")
        peak = int(rss.read().split()[-1]) if wrapped is not cmd else 0
        out.seek(0)
        return out.read(), wall, ru.ru_utime + ru.ru_stime, peak


def best_program(cmd, path, repeat, env=None) -> dict:
    return best_of([run_program(cmd, path, env) for _ in range(repeat)])


def best_of(runs: list) -> dict:
    return {
        "wall_s": min(r[1] for r in runs),
        "cpu_s": min(r[2] for r in runs),
        "peak_rss_mib": max(r[3] for r in runs) / 1024,
        "report": runs[-1][0],
    }


def report_part(text: bytes) -> bytes:
    return text[text.find(b"---Simulation complete") :]


def end_to_end(
    label: str, path: Path, opts: list[str], refs: int, repeat: int, dinero: str | None, env: dict | None = None
) -> dict:
    cm_runs, d4_runs = [], []
    for _ in range(repeat):  # in turns, so that a burst of load falls on both alike
        cm_runs.append(run_program([*CM, "dinero", *opts], path, env))
        if dinero:
            d4_runs.append(run_program([dinero, *opts], path))
    cm = best_of(cm_runs)
    row = {"trace": label, "refs": refs, "bytes": path.stat().st_size, "cachemode": cm}
    if dinero:
        d4 = best_of(d4_runs)
        row["dineroIV"] = d4
        row["reports_identical"] = report_part(cm["report"]) == report_part(d4["report"])
        row["speedup_wall"] = d4["wall_s"] / cm["wall_s"]
        row["speedup_cpu"] = d4["cpu_s"] / cm["cpu_s"]
    for side in ("cachemode", "dineroIV"):
        if side in row:
            del row[side]["report"]
    return row


def dinero_version(dinero: str) -> str:
    p = subprocess.run([dinero, *DINERO_UNIFIED, "-informat", "d"], input=b"0 0\n", capture_output=True)
    m = re.search(rb"Dinero IV cache simulator, version (\S+)", p.stdout)
    return f"Dinero IV version {m.group(1).decode()}" if m else "Dinero IV (version unknown)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cpu_bench.json"))
    args = ap.parse_args()
    if not MM32.exists():
        sys.exit(f"cpu_bench: {MM32} not found (the shared traces sit beside the repository)")
    dinero = os.environ.get("DINEROIV")
    info = machine()
    info["dineroIV"] = dinero_version(dinero) if dinero else "not given (set DINEROIV=/path/to/dineroIV)"
    print(f"cpu_bench: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), Python {info['python']}")
    print(f"peers: pycachesim {info['pycachesim']}; {info['dineroIV']}")
    print(f"start: {load()}; {args.refs:,} refs, best of {args.repeat}, rates per CPU second unless marked wall")
    out: dict = {"machine": info, "load_start": os.getloadavg()}

    n = args.refs
    mm = mm32_trace()
    stores = np.random.default_rng(2).random(n) < 0.25
    workloads = [("mm32", repeat_to(mm, n).addrs), ("miss-heavy", miss_heavy(n))]
    simulate(two_level(), mm.slice(0, 1000), threads=1)  # warm up
    rows = []
    print("\n1. two levels, one core: cachemode against pycachesim (same process)")
    for name, addrs in workloads:
        for st in (None, stores):
            r = throughput(name, addrs, st, args.repeat)
            rows.append(r)
            print(
                f"  {name:10s} {r['mode']:12s} cachemode {r['cachemode_1core_Mrefs_per_cpu_s']:6.1f} M/s  "
                f"pycachesim {r['pycachesim_Mrefs_per_cpu_s']:6.1f} M/s  ratio {r['ratio_cpu']:.2f}x   "
                f"(wall: {r['cachemode_1core_Mrefs_per_wall_s']:.1f} / {r['pycachesim_Mrefs_per_wall_s']:.1f}; "
                f"cachemode on all cores {r['cachemode_all_cores_Mrefs_per_wall_s']:.1f})  "
                f"misses L1/L2 {r['cachemode_misses']} vs {r['pycachesim_misses']}"
            )
    out["throughput"] = rows

    loads = Trace(np.zeros(n, np.int8), workloads[0][1], np.full(n, 8, np.uint16))
    cpu, wall, _ = timed(lambda: simulate(CacheConfig("32k", 64, 8), loads, threads=1), args.repeat)
    out["one_level_Mrefs_per_cpu_s"] = n / cpu / 1e6
    long_mm = repeat_to(mm, n)
    ccpu, cwall, _ = timed(lambda: simulate(two_level(ccc=True, split=True), long_mm, threads=1), args.repeat)
    out["ccc_Mrefs_per_cpu_s"] = n / ccpu / 1e6
    print("\n2. one core")
    print(f"  one level (L1 alone, mm32 loads): {n / cpu / 1e6:.1f} M/s (wall {n / wall / 1e6:.1f})")
    print(
        f"  3C classification (split L1, ccc on L1d and L2, mm32 with its fetches): {n / ccpu / 1e6:.1f} M/s "
        f"(wall {n / cwall / 1e6:.1f})"
    )

    print("\n3. end to end, `cachemode dinero` against dineroIV (wall and CPU seconds, peak RSS)")
    with tempfile.TemporaryDirectory() as tmp:
        mm40 = Path(tmp) / "mm32x40.din"
        mm40.write_bytes(MM32.read_bytes() * 40)
        heavy = Path(tmp) / "miss-heavy.xdin"
        with TraceWriter(heavy) as w:
            w.write(Trace(stores.astype(np.int8), workloads[1][1], np.full(n, 8, np.uint16)))
        # warm: Python's bytecode cached, as after an install and a first run (with PYTHONDONTWRITEBYTECODE set,
        # as on the project's machine, every run would compile cachemode's modules again)
        warm = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        warm["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "warm-pycache")
        subprocess.run([*CM, "dinero", *DINERO_SPLIT, "-informat", "d"], input=b"0 0\n", capture_output=True, env=warm)
        split, unified = [*DINERO_SPLIT, "-informat", "d"], [*DINERO_UNIFIED, "-informat", "D"]
        e2e = [
            end_to_end("mm32 x 40 (din)", mm40, split, len(mm) * 40, args.repeat, dinero, warm),
            end_to_end("miss-heavy (xdin)", heavy, unified, n, args.repeat, dinero, warm),
        ]
        for r in e2e:
            c = r["cachemode"]
            line = (
                f"  {r['trace']:18s} {r['refs'] / 1e6:5.1f}M refs, {r['bytes'] / 1e6:4.0f} MB: cachemode "
                f"{c['wall_s']:.2f} s wall {c['cpu_s']:.2f} s CPU {c['peak_rss_mib']:.0f} MiB"
            )
            if "dineroIV" in r:
                d = r["dineroIV"]
                line += (
                    f" | dineroIV {d['wall_s']:.2f} s wall {d['cpu_s']:.2f} s CPU {d['peak_rss_mib']:.0f} MiB"
                    f" | {r['speedup_wall']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU; "
                    f"reports identical: {r['reports_identical']}"
                )
            print(line)
        out["end_to_end"] = e2e

        small = Path(tmp) / "k1.din"
        small.write_bytes(b"".join(MM32.read_bytes().splitlines(keepends=True)[:1000]))
        k1 = best_program([*CM, "dinero", *DINERO_SPLIT, "-informat", "d"], small, max(args.repeat, 5), warm)
        fresh = Path(tmp) / "pycache"
        env = dict(warm, PYTHONPYCACHEPREFIX=str(fresh))
        first = run_program([*CM, "dinero", *DINERO_SPLIT, "-informat", "d"], MM32, env)
        out["small_run"] = {k: v for k, v in k1.items() if k != "report"}
        out["first_run_mm32"] = {"wall_s": first[1], "cpu_s": first[2]}
        print("\n4. start-up")
        mib = k1["peak_rss_mib"]
        print(f"  1,000-reference run: {k1['wall_s']:.3f} s wall, {k1['cpu_s']:.3f} s CPU, {mib:.0f} MiB")
        print(f"  first run on mm32, every module compiled afresh: {first[1]:.2f} s wall, {first[2]:.2f} s CPU")
    out["load_end"] = os.getloadavg()
    print(f"\nend: {load()}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
