"""Miss-rate curves over cache size and associativity, one single-level simulation per point.

The trace is read once, in chunks; each chunk runs through every point's cache in a thread pool (the compiled
kernels release the GIL), so the points use every core and memory stays bounded whatever the trace's length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from cachemode.cpu.config import CacheConfig, ConfigError
from cachemode.cpu.kernels import CacheState
from cachemode.cpu.stats import CacheStats
from cachemode.cpu.trace import Trace, TraceReader, read_ahead


@dataclass
class SweepPoint:
    size: int
    assoc: int  # 0 = fully associative
    stats: CacheStats

    @property
    def miss_rate(self) -> float:
        return self.stats.miss_rate


def sweep(
    trace: Trace | str | os.PathLike,
    sizes: list[int],
    assocs: list[int],
    block_size: int = 64,
    *,
    fmt: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **policy,
) -> list[SweepPoint]:
    """Simulate every (size, assoc) pair; ``assoc`` 0 means fully associative. Returns points sorted by
    (assoc, size). Pairs that do not make a valid cache (more ways than blocks) are skipped. ``trace`` may be a
    file name: it is read once, in chunks, each chunk run through every cache (memory stays bounded)."""
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
    states = [CacheState(*cfg.params()) for _, _, cfg in configs]
    workers = workers or os.cpu_count() or 1
    end = Trace(np.array([4], np.int8), np.zeros(1, np.uint64), np.zeros(1, np.uint16))  # end-of-run copy-back
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool, _chunks(trace, fmt) as chunks:
        for chunk in chunks:
            list(pool.map(lambda st, c=chunk: st.run(c.types, c.addrs, c.sizes, _NO_ORIGIN, False), states))
            done += len(chunk)
            if progress:
                progress(done, 0)
        list(pool.map(lambda st: st.run(end.types, end.addrs, end.sizes, _NO_ORIGIN, False), states))
    out = [
        SweepPoint(s, a, CacheStats.from_counters(f"{s}/{a}", cfg, st.cnt))
        for (s, a, cfg), st in zip(configs, states, strict=True)
    ]
    out.sort(key=lambda p: (p.assoc if p.assoc else 1 << 62, p.size))
    return out


_NO_ORIGIN = np.empty(0, np.int64)


@contextmanager
def _chunks(trace: Trace | str | os.PathLike, fmt: str | None) -> Iterator[Iterable[Trace]]:
    if isinstance(trace, Trace):
        yield [trace]
        return
    with TraceReader(trace, fmt) as reader:
        yield read_ahead(reader)


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
