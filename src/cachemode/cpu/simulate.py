"""Run a trace through a hierarchy: route events to caches, feed each level's output to the next.

Routing follows Dinero IV's ``cmdmain.c``: instruction fetches go to the instruction side, invalidates to
both sides (instruction first), everything else to the data side; a unified cache receives everything. The
instruction and data streams leaving split levels are merged in trace order (each event carries the index
of the trace record that caused it) before the first unified level. At the end of the run a whole-cache
copy-back goes to the data side and travels down the hierarchy; its bytes count as bytes to memory.

The trace arrives in chunks (:class:`Simulation`); each chunk goes through the levels one after another. That
gives the same result as Dinero's depth-first processing because a cache's behaviour depends only on the order
of the events it receives. A first split level reads the trace itself, each side's cache taking its references
(no copy); a side with no cache at a level passes its references on to the next level, as in Dinero.
"""

from __future__ import annotations

import os

import numpy as np

from cachemode.cpu import kernels as K
from cachemode.cpu.config import CacheConfig, Hierarchy
from cachemode.cpu.kernels import CacheState, run_cache
from cachemode.cpu.stats import CacheStats, SimResult
from cachemode.cpu.trace import Trace, TraceReader, read_ahead

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

    def select(self, mask: np.ndarray, offset: int = 0) -> Stream:
        idx = np.flatnonzero(mask)
        origin = idx.astype(np.int64) + offset if self.origin is None else self.origin[idx]
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


def top_stream(trace: Trace, *, copyback: bool = True) -> Stream:
    """The trace as one event stream, with (by default) the end-of-run copy-back: for :func:`run_one`."""
    types, addrs, sizes = trace.types, trace.addrs, trace.sizes
    if copyback:
        types = np.append(types, np.int8(4))
        addrs = np.append(addrs, np.uint64(0))
        sizes = np.append(sizes, np.uint16(0))
    return Stream(types, addrs, sizes)


ISIDE, DSIDE = 1, 2  # a cache given the whole trace takes instruction fetches and invalidates, or all but fetches
CHUNK = 1 << 18  # top-level events per pass through the hierarchy: buffers stay small and are reused


class _Runner:
    """Per-cache state that persists while chunks of the trace flow through the hierarchy."""

    def __init__(self, hierarchy: Hierarchy):
        self.levels = hierarchy.levels
        self.states = {name: CacheState(*cfg.params()) for name, cfg in hierarchy.caches()}

    def _run(self, name: str, stream: Stream, emit: bool, offset: int, side: int = 0) -> Stream:
        origin = _EMPTY_ORIGIN if stream.origin is None else stream.origin
        t, a, s, o = self.states[name].run(stream.types, stream.addrs, stream.sizes, origin, emit, offset, side)
        return Stream(t, a, s, o if stream.origin is not None or side else None)

    def feed(self, stream: Stream, offset: int) -> None:
        """Send top-level events (trace indexes ``offset``...) through every level."""
        istream = dstream = None
        unified: Stream | None = stream
        nlev = len(self.levels)
        for n, lev in enumerate(self.levels, 1):
            emit = n < nlev
            if lev.split:
                if unified is not None:  # first split level: each cache takes its side of the trace
                    ty = unified.types
                    if lev.icache is not None:
                        istream = self._run(f"l{n}-icache", unified, emit, offset, ISIDE)
                    else:  # no cache on this side: its references go on to the next level
                        istream = unified.select((ty == 2) | (ty == 5), offset)
                    if lev.dcache is not None:
                        dstream = self._run(f"l{n}-dcache", unified, emit, offset, DSIDE)
                    else:
                        dstream = unified.select(ty != 2, offset)
                    unified = None
                    continue
                if lev.icache is not None:
                    istream = self._run(f"l{n}-icache", istream, emit, offset)
                if lev.dcache is not None:
                    dstream = self._run(f"l{n}-dcache", dstream, emit, offset)
            else:
                if unified is None:
                    unified = merge(istream, dstream)
                unified = self._run(f"l{n}-ucache", unified, emit, offset)


def partitioning(hierarchy: Hierarchy, threads: int) -> tuple[int, int]:
    """(shift, parts) for running the hierarchy as independent slices of the sets, or (0, 1).

    Blocks whose address bits ``[shift, shift + log2(parts))`` are equal land in the same slice of sets at
    every level (those bits are set-index bits everywhere), so each slice can run on its own core with the
    exact result of a serial run. Needs per-set replacement (LRU, FIFO, PLRU), no 3C shadow cache and a
    power-of-2 number of sets everywhere.
    """
    caches = [cfg for _, cfg in hierarchy.caches()]
    if threads < 2 or any(c.ccc or c.repl == "random" or c.nsets & (c.nsets - 1) for c in caches):
        return 0, 1
    shift = max(c.block_size.bit_length() - 1 for c in caches)
    room = min(c.block_size.bit_length() - 1 + c.nsets.bit_length() - 1 - shift for c in caches)
    parts = 1
    while parts * 2 <= threads and (parts * 2).bit_length() - 1 <= room:
        parts *= 2
    return (shift, parts) if parts > 1 else (0, 1)


PARALLEL_MIN_EVENTS = 1 << 18  # below this, threads cost more than they save


def default_threads(reserved: int = 0) -> int:
    """``CACHEMODE_THREADS`` if set, else the cores this process may run on less ``reserved`` (at least 1)."""
    env = os.environ.get("CACHEMODE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - reserved)


class Simulation:
    """A run fed a trace chunk by chunk (any length, bounded memory), then finished.

    :meth:`feed` takes trace records; with ``flushcount`` a copy-back and invalidate of every cache follows each
    N-th record (the one due after the last record fed so far waits, so that statistics taken now exclude it, as
    Dinero IV prints them). :meth:`stats` can be called between feeds; :meth:`finish` ends the run.
    ``simulate()`` is the one-call form.
    """

    def __init__(
        self, hierarchy: Hierarchy, *, flushcount: int = 0, threads: int | None = None, reader_thread: bool = False
    ):
        self.hierarchy = hierarchy
        # a thread reading and parsing the trace beside the simulation has a core of its own by default: a slice
        # of the sets on that core too would only take turns with it (and every slice scans the whole trace)
        self.reserved_cores = 1 if reader_thread else 0
        self.flushcount = flushcount if flushcount and flushcount > 0 else 0
        self.threads = threads
        self.references = 0  # trace records fed
        self.unrouted_counts = {"ifetch": 0, "data": 0}  # references of a side without any cache
        levels = hierarchy.levels
        self._no_icache = not any(lev.icache is not None or not lev.split for lev in levels)
        self._no_dcache = not any(lev.dcache is not None or not lev.split for lev in levels)
        self.pos = 0  # top-level events sent down (records plus inserted flushes)
        self.flush_due = False
        self.runners: list[_Runner] = []
        self.parts = 1

    def _start(self, first_chunk: int) -> None:
        threads = self.threads
        if threads is None:
            threads = default_threads(self.reserved_cores) if first_chunk >= PARALLEL_MIN_EVENTS else 1
        shift, self.parts = partitioning(self.hierarchy, threads)
        self.runners = [_Runner(self.hierarchy) for _ in range(self.parts)]
        if self.parts > 1:
            for pid, runner in enumerate(self.runners):
                for state in runner.states.values():
                    state.partition(shift, self.parts - 1, pid)

    def _each(self, fn) -> None:
        if self.parts == 1:
            fn(0)
            return
        list(self._pool().map(fn, range(self.parts)))

    def _pool(self):
        if not hasattr(self, "_executor"):
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=self.parts)
        return self._executor

    def _send(self, types: np.ndarray, addrs: np.ndarray, sizes: np.ndarray) -> None:
        """Send top-level events through the hierarchy, CHUNK at a time."""
        n = len(types)
        start = self.pos
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            stream = Stream(types[lo:hi], addrs[lo:hi], sizes[lo:hi])
            self._each(lambda pid, s=stream, off=start + lo: self.runners[pid].feed(s, off))
        self.pos += n

    def _flush(self) -> None:
        self._send(_FLUSH_TYPES, _FLUSH_ZEROS, _FLUSH_SIZES)
        self.flush_due = False

    def feed(self, trace: Trace) -> None:
        """Run trace records through the hierarchy (state carries over between calls)."""
        n = len(trace)
        if n == 0:
            return
        if not self.runners:
            self._start(n)
        if self._no_icache or self._no_dcache:
            fetches = int(np.count_nonzero(trace.types == 2))
            self.unrouted_counts["ifetch"] += fetches
            self.unrouted_counts["data"] += n - fetches - int(np.count_nonzero(trace.types >= 4))
        if self.flush_due:
            self._flush()
        types, addrs, sizes = trace.types, trace.addrs, trace.sizes
        fc = self.flushcount
        if fc:
            first = fc - self.references % fc  # records until the next flush (1-based within this chunk)
            after = np.arange(first, n + 1, fc)  # flush after these many records of the chunk
            self.flush_due = len(after) > 0 and after[-1] == n
            inner = after[:-1] if self.flush_due else after
            if len(inner):
                ins = np.repeat(inner, 2)
                types = np.insert(types, ins, np.tile(_FLUSH_TYPES, len(inner)))
                addrs = np.insert(addrs, ins, np.zeros(2 * len(inner), np.uint64))
                sizes = np.insert(sizes, ins, np.zeros(2 * len(inner), sizes.dtype))
        self._send(types, addrs, sizes)
        self.references += n

    def finish(self, copyback: bool = True) -> SimResult:
        """End the run: a due flush, then (by default) the end-of-run copy-back; return the statistics."""
        if not self.runners:
            self._start(0)
        if self.flush_due:
            self._flush()
        if copyback:
            self._send(np.array([4], np.int8), np.zeros(1, np.uint64), np.zeros(1, np.uint16))
        if hasattr(self, "_executor"):
            self._executor.shutdown()
            del self._executor
        return self.stats()

    def unrouted(self) -> dict[str, int]:
        """References of a side of the hierarchy that has no cache at all (as Dinero IV, they go to memory
        uncounted): ``{"ifetch": N}`` without an i or u cache, ``{"data": N}`` without a d or u cache."""
        sides = (("ifetch", self._no_icache), ("data", self._no_dcache))
        return {k: self.unrouted_counts[k] for k, missing in sides if missing and self.unrouted_counts[k]}

    def stats(self) -> SimResult:
        result = SimResult(references=self.references, unrouted=self.unrouted())
        for name, cfg in self.hierarchy.caches():
            cnt = sum(r.states[name].cnt for r in self.runners) if self.runners else np.zeros(K.NCOUNTERS, np.int64)
            result.caches.append(CacheStats.from_counters(name, cfg, cnt))
        return result


_FLUSH_TYPES = np.array([4, 5], np.int8)  # copy back (data side), then invalidate (both sides)
_FLUSH_ZEROS = np.zeros(2, np.uint64)
_FLUSH_SIZES = np.zeros(2, np.uint16)


def simulate(
    hierarchy: Hierarchy | CacheConfig,
    trace: Trace | str | os.PathLike,
    *,
    fmt: str | None = None,
    flushcount: int = 0,
    copyback: bool = True,
    threads: int | None = None,
) -> SimResult:
    """Simulate ``trace`` (a :class:`Trace`, or a file name read in chunks, ``-`` for stdin) on ``hierarchy``.

    ``fmt``: the file's format (default: from its name and first line).
    ``flushcount``: copy back and invalidate every cache after every N records (Dinero's ``-flushcount``).
    ``copyback``: write every dirty block back at the end of the run (Dinero always does).
    ``threads``: cores to use (default: ``CACHEMODE_THREADS`` or every core, less the one that reads and parses
    a trace file, for traces long enough to gain; 1 runs serially). Parallel runs split the sets
    between threads (see :func:`partitioning`); the counts are exactly those of a serial run.
    """
    if isinstance(hierarchy, CacheConfig):
        hierarchy = Hierarchy.single(hierarchy)
    sim = Simulation(hierarchy, flushcount=flushcount, threads=threads, reader_thread=not isinstance(trace, Trace))
    if isinstance(trace, Trace):
        sim.feed(trace)
    else:
        with TraceReader(trace, fmt) as reader:
            for chunk in read_ahead(reader):
                sim.feed(chunk)
    return sim.finish(copyback)
