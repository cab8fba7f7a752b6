"""Miss-rate curves over cache size and associativity, one single-level simulation per point.

The kernel releases the GIL (``nogil=True``), so the points run in a thread pool on every core and share one
copy of the trace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from cachemode.cpu.config import CacheConfig, ConfigError
from cachemode.cpu.simulate import run_one, top_stream
from cachemode.cpu.stats import CacheStats
from cachemode.cpu.trace import Trace


@dataclass
class SweepPoint:
    size: int
    assoc: int  # 0 = fully associative
    stats: CacheStats

    @property
    def miss_rate(self) -> float:
        return self.stats.miss_rate


def sweep(
    trace: Trace,
    sizes: list[int],
    assocs: list[int],
    block_size: int = 64,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **policy,
) -> list[SweepPoint]:
    """Simulate every (size, assoc) pair; ``assoc`` 0 means fully associative. Returns points sorted by
    (assoc, size). Pairs that do not make a valid cache (more ways than blocks) are skipped."""
    configs = []
    for a in assocs:
        for s in sizes:
            try:
                cfg = CacheConfig(s, block_size, a, **policy)
            except ConfigError:
                if a and a > s // block_size:
                    continue
                raise
            configs.append((s, a, cfg))
    if not configs:
        raise ConfigError("no valid (size, assoc) pair in the sweep")
    stream = top_stream(trace)
    workers = workers or os.cpu_count() or 1
    out: list[SweepPoint] = []

    def job(item):
        s, a, cfg = item
        cnt, _ = run_one(cfg, stream, emit=False)
        return SweepPoint(s, a, CacheStats.from_counters(f"{s}/{a}", cfg, cnt))

    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job, c) for c in configs]
        for fut in as_completed(futures):
            out.append(fut.result())
            done += 1
            if progress:
                progress(done, len(configs))
    out.sort(key=lambda p: (p.assoc if p.assoc else 1 << 62, p.size))
    return out


def plot(points: list[SweepPoint], path: str, title: str = "") -> None:
    """Miss rate against cache size, one line per associativity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_assoc: dict[int, list[SweepPoint]] = {}
    for p in points:
        by_assoc.setdefault(p.assoc, []).append(p)
    for a, pts in by_assoc.items():
        pts.sort(key=lambda p: p.size)
        label = "fully assoc." if a == 0 else f"{a}-way"
        ax.plot([p.size for p in pts], [p.miss_rate for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache size (bytes)")
    ax.set_ylabel("miss rate")
    ax.set_title(title or "miss rate by cache size and associativity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
