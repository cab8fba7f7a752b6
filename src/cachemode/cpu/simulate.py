"""Run a trace through a hierarchy: route events to caches, feed each level's output to the next.

Routing follows Dinero IV's ``cmdmain.c``: instruction fetches go to the instruction side, invalidates to
both sides (instruction first), everything else to the data side; a unified cache receives everything. The
instruction and data streams leaving split levels are merged in trace order (each event carries the index
of the trace record that caused it) before the first unified level. At the end of the run a whole-cache
copy-back goes to the data side and travels down the hierarchy; its bytes count as bytes to memory.

Levels are processed one after another over whole streams. That gives the same result as Dinero's
depth-first processing because a cache's behaviour depends only on the order of the events it receives.
"""

from __future__ import annotations

import os

import numpy as np

from cachemode.cpu.config import CacheConfig, Hierarchy
from cachemode.cpu.kernels import run_cache
from cachemode.cpu.stats import CacheStats, SimResult
from cachemode.cpu.trace import Trace, read_trace

_EMPTY_ORIGIN = np.empty(0, np.int64)


class Stream:
    """An event stream: types, addresses, sizes and (optionally) the trace index of each event."""

    __slots__ = ("addrs", "origin", "sizes", "types")

    def __init__(self, types, addrs, sizes, origin=None):
        self.types = types
        self.addrs = addrs
        self.sizes = sizes
        self.origin = origin

    def __len__(self) -> int:
        return len(self.types)

    def select(self, mask: np.ndarray) -> Stream:
        idx = np.flatnonzero(mask)
        origin = idx.astype(np.int64) if self.origin is None else self.origin[idx]
        return Stream(self.types[idx], self.addrs[idx], self.sizes[idx], origin)

    def origins(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.origin is None else self.origin


def merge(istream: Stream, dstream: Stream) -> Stream:
    """Merge two streams by trace index, instruction side first for the same index (stable)."""
    origin = np.concatenate([istream.origins(), dstream.origins()])
    order = np.argsort(origin, kind="stable")
    cat = np.concatenate
    return Stream(
        cat([istream.types, dstream.types])[order],
        cat([istream.addrs, dstream.addrs])[order],
        cat([istream.sizes, dstream.sizes])[order],
        origin[order],
    )


def run_one(cfg: CacheConfig, stream: Stream, emit: bool) -> tuple[np.ndarray, Stream]:
    """Run one cache over a stream; returns (counters, downstream stream)."""
    lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed = cfg.params()
    origin = _EMPTY_ORIGIN if stream.origin is None else stream.origin
    cnt, t, a, s, o = run_cache(
        stream.types, stream.addrs, stream.sizes, origin,
        lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed, 1 if emit else 0,
    )  # fmt: skip
    return cnt, Stream(t, a, s, o if stream.origin is not None else None)


def top_stream(trace: Trace, *, flushcount: int = 0, copyback: bool = True) -> Stream:
    """The trace as an event stream, with flushes every ``flushcount`` records and the final copy-back."""
    types, addrs = trace.types, trace.addrs
    sizes = trace.sizes.astype(np.uint32)
    n = len(types)
    if flushcount and flushcount > 0 and n >= flushcount:
        # after every flushcount records: copy-back (data side) then invalidate (both sides)
        nflush = n // flushcount
        pos = np.arange(1, nflush + 1) * flushcount  # insert before record index pos
        ins = np.repeat(pos, 2)
        types = np.insert(types, ins, np.tile(np.array([4, 5], np.int8), nflush))
        addrs = np.insert(addrs, ins, np.zeros(2 * nflush, np.uint64))
        sizes = np.insert(sizes, ins, np.zeros(2 * nflush, np.uint32))
    if copyback:
        types = np.append(types, np.int8(4))
        addrs = np.append(addrs, np.uint64(0))
        sizes = np.append(sizes, np.uint32(0))
    return Stream(
        np.ascontiguousarray(types, np.int8),
        np.ascontiguousarray(addrs, np.uint64),
        np.ascontiguousarray(sizes, np.uint32),
    )


def simulate(
    hierarchy: Hierarchy | CacheConfig,
    trace: Trace | str | os.PathLike,
    *,
    flushcount: int = 0,
    copyback: bool = True,
) -> SimResult:
    """Simulate ``trace`` (a :class:`Trace` or a file path) on ``hierarchy`` and return the statistics.

    ``flushcount``: copy back and invalidate every cache after every N records (Dinero's ``-flushcount``).
    ``copyback``: write every dirty block back at the end of the run (Dinero always does).
    """
    if isinstance(hierarchy, CacheConfig):
        hierarchy = Hierarchy.single(hierarchy)
    if not isinstance(trace, Trace):
        trace = read_trace(trace)
    stream = top_stream(trace, flushcount=flushcount, copyback=copyback)
    counters: dict[str, np.ndarray] = {}
    levels = hierarchy.levels
    istream: Stream | None = None
    dstream: Stream | None = None
    unified: Stream | None = stream
    for n, lev in enumerate(levels, 1):
        last = n == len(levels)
        if lev.split:
            if unified is not None:  # first split level: route the trace
                ty = unified.types
                istream = unified.select((ty == 2) | (ty == 5))
                dstream = unified.select(ty != 2)
                unified = None
            if lev.icache is not None:
                counters[f"l{n}-icache"], istream = run_one(lev.icache, istream, not last)
            if lev.dcache is not None:
                counters[f"l{n}-dcache"], dstream = run_one(lev.dcache, dstream, not last)
        else:
            if unified is None:
                unified = merge(istream, dstream)
            counters[f"l{n}-ucache"], unified = run_one(lev.unified, unified, not last)
    result = SimResult(references=len(trace))
    for name, cfg in hierarchy.caches():
        result.caches.append(CacheStats.from_counters(name, cfg, counters[name]))
    return result
