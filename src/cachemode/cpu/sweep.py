"""Miss-rate curves over cache size and associativity, one single-level simulation per point.

Here, the trace is read once, in chunks; each chunk runs through every point's cache in a thread pool (the
compiled kernels release the GIL), so the points use every core and memory stays bounded whatever the trace's
length. On a Dask cluster (an :class:`~cachemode.execution.Executor` that is ``remote``) each point is a task:
workers read the trace from its path when they all see the same file there (same size and checksum), and are
otherwise sent the event stream once. The points are sorted afterwards, so the result does not depend on where
they ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cachemode.cpu.config import CacheConfig, ConfigError
from cachemode.cpu.kernels import CacheState
from cachemode.cpu.simulate import Stream, run_one, top_stream
from cachemode.cpu.stats import CacheStats
from cachemode.cpu.trace import Trace, TraceReader, read_ahead, read_trace
from cachemode.execution import Executor, shared_file


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


def sweep(
    trace: Trace | str | os.PathLike,
    sizes: list[int],
    assocs: list[int],
    block_size: int = 64,
    *,
    fmt: str | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
    **policy,
) -> list[SweepPoint]:
    """Simulate every (size, assoc) pair; ``assoc`` 0 means fully associative. Returns points sorted by
    (assoc, size). Pairs that do not make a valid cache (more ways than blocks) are skipped.

    ``trace`` may be a file name (``-``: stdin). Here it is streamed through ``workers`` threads (default:
    every core) and ``progress(references, 0)`` follows it; with a remote ``executor`` the points are its
    tasks and ``progress(points, total)`` follows them."""
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
    if executor is not None and executor.remote:
        out = _sweep_tasks(executor, trace, fmt, configs, progress)
    else:
        out = _sweep_streamed(trace, fmt, configs, workers or os.cpu_count() or 1, progress)
    out.sort(key=lambda p: (p.assoc if p.assoc else 1 << 62, p.size))
    return out


def _sweep_streamed(
    trace: Trace | str | os.PathLike,
    fmt: str | None,
    configs: list[tuple[int, int, CacheConfig]],
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> list[SweepPoint]:
    """Every cache here, fed chunk by chunk: memory stays bounded whatever the trace's length."""
    states = [CacheState(*cfg.params()) for _, _, cfg in configs]
    end = Trace(np.array([4], np.int8), np.zeros(1, np.uint64), np.zeros(1, np.uint16))  # end-of-run copy-back
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool, _chunks(trace, fmt) as chunks:
        for chunk in chunks:
            list(pool.map(lambda st, c=chunk: st.run(c.types, c.addrs, c.sizes, _NO_ORIGIN, False), states))
            done += len(chunk)
            if progress:
                progress(done, 0)
        list(pool.map(lambda st: st.run(end.types, end.addrs, end.sizes, _NO_ORIGIN, False), states))
    return [
        SweepPoint(s, a, CacheStats.from_counters(f"{s}/{a}", cfg, st.cnt))
        for (s, a, cfg), st in zip(configs, states, strict=True)
    ]


def _sweep_tasks(
    executor: Executor,
    trace: Trace | str | os.PathLike,
    fmt: str | None,
    configs: list[tuple[int, int, CacheConfig]],
    progress: Callable[[int, int], None] | None,
) -> list[SweepPoint]:
    """One task per point on a cluster: the workers read the trace's file, or get its event stream once."""
    source: Stream | TraceFile
    path = None if isinstance(trace, Trace) or os.fspath(trace) == "-" else os.path.abspath(trace)
    digest = shared_file(executor, path) if path else None
    if path and digest is not None:
        source = executor.share(TraceFile(path, fmt, digest))
    else:
        source = executor.share(top_stream(trace if isinstance(trace, Trace) else read_trace(trace, fmt)))
    out: list[SweepPoint] = []
    for _, point in executor.map(_point, configs, source):
        out.append(point)
        if progress:
            progress(len(out), len(configs))
    return out


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
