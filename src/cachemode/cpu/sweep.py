"""Miss-rate curves over cache size and associativity, one single-level simulation per point.

The points run on an :class:`~cachemode.execution.Executor`: by default a thread pool on every core (the kernel
releases the GIL, so the threads share one copy of the trace), or Dask workers, which read the trace from its
path when they all see the same file there (same size and checksum), and are otherwise sent the event stream
once. The points are sorted afterwards, so the result does not depend on where they ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from cachemode.cpu.config import CacheConfig, ConfigError
from cachemode.cpu.simulate import Stream, run_one, top_stream
from cachemode.cpu.stats import CacheStats
from cachemode.cpu.trace import Trace, read_trace
from cachemode.execution import Executor, LocalExecutor, shared_file


@dataclass
class SweepPoint:
    size: int
    assoc: int  # 0 = fully associative
    stats: CacheStats

    @property
    def miss_rate(self) -> float:
        return self.stats.miss_rate


@dataclass(frozen=True)
class TraceFile:
    """A trace the workers read themselves: its path (the same file everywhere: ``digest``) and format."""

    path: str
    fmt: str | None
    digest: str


@lru_cache(maxsize=1)
def _stream_of(source: TraceFile) -> Stream:
    """Parse a shared trace once per worker process (the tasks of one sweep all want the same one)."""
    return top_stream(read_trace(source.path, source.fmt))


def _point(item: tuple[int, int, CacheConfig], source: Stream | TraceFile) -> SweepPoint:
    """One task: simulate one cache over the shared stream."""
    s, a, cfg = item
    stream = _stream_of(source) if isinstance(source, TraceFile) else source
    cnt, _ = run_one(cfg, stream, emit=False)
    return SweepPoint(s, a, CacheStats.from_counters(f"{s}/{a}", cfg, cnt))


def sweep(
    trace: Trace,
    sizes: list[int],
    assocs: list[int],
    block_size: int = 64,
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    trace_path: str | None = None,
    trace_format: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    **policy,
) -> list[SweepPoint]:
    """Simulate every (size, assoc) pair; ``assoc`` 0 means fully associative. Returns points sorted by
    (assoc, size). Pairs that do not make a valid cache (more ways than blocks) are skipped. The points run on
    ``executor``, or ``workers`` threads here (default: every core); ``trace_path`` (the file ``trace`` was
    read from) lets cluster workers read it themselves instead of receiving it."""
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
    own = executor is None
    ex = executor if executor is not None else LocalExecutor(workers or os.cpu_count() or 1)
    try:
        digest = shared_file(ex, os.path.abspath(trace_path)) if trace_path and ex.remote else None
        if digest is not None:
            source = ex.share(TraceFile(os.path.abspath(trace_path), trace_format, digest))
        else:
            source = ex.share(top_stream(trace))
        out: list[SweepPoint] = []
        for _, point in ex.map(_point, configs, source):
            out.append(point)
            if progress:
                progress(len(out), len(configs))
    finally:
        if own:
            ex.close()
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
