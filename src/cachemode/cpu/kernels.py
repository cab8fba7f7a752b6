"""Run one cache over an event stream with Dinero IV's accounting: the Python side of the compiled core.

The kernels are C (``_core.c``, built at install time): :func:`cachemode.cpu._core.run` in its general form handles
every policy, the 3C shadow cache and copy-back/invalidate events; its fast form is a small copy of the common case
(no 3C, up to 32 ways, demand references) that hands copy-back and invalidate events back. :class:`CacheState` owns
the state arrays between calls; the kernels are resumable: they stop when an output buffer could overflow and the
loop here drains it and calls again.

State is flat arrays: ``tags[set * assoc + way]`` holds the block number (-1 when invalid), ``stamp`` the last use
(LRU) or the insertion time (FIFO), ``dirty`` a byte, ``plru`` the tree bits (assoc - 1 per set). Caches with many
ways (and the fully associative shadow cache used for 3C classification) also keep an open-addressing hash from
block number to slot. The set of a block is ``block % sets`` (a mask when the number of sets is a power of 2).

For parallel runs a state can own a slice of the sets (:meth:`CacheState.partition`); it then skips every piece of a
reference that belongs to another slice.
"""

from __future__ import annotations

import numpy as np

from cachemode.cpu import _core

# counter layout (int64 array), as the core defines it
FETCH = _core.FETCH  # 0..3: read, write, ifetch, misc
MISS = _core.MISS
COMP = _core.COMP
CAP = _core.CAP
CONF = _core.CONF
MULTIBLOCK = _core.MULTIBLOCK
BYTES_READ = _core.BYTES_READ
BYTES_WRITTEN = _core.BYTES_WRITTEN
WRITEBACKS = _core.WRITEBACKS  # dirty victims written back on eviction
COPYBACK_BLOCKS = _core.COPYBACK_BLOCKS  # dirty blocks written by copy-back events (end of run, flushes)
COPYBACK_BYTES = _core.COPYBACK_BYTES
WRITETHROUGHS = _core.WRITETHROUGHS
FILLS = _core.FILLS
INVALIDATED_DIRTY = _core.INVALIDATED_DIRTY  # dirty blocks dropped by an invalidate
NCOUNTERS = _core.NCOUNTERS

HASH_MIN_ASSOC = _core.HASH_MIN_ASSOC  # caches with more ways than this use the block -> slot hash
OUT_FULL, SEEN_FULL, SPECIAL = _core.OUT_FULL, _core.SEEN_FULL, _core.SPECIAL


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


class CacheState:
    """The state of one simulated cache between kernel calls (flat arrays plus a few scalars)."""

    def __init__(self, lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed):
        nb = nsets * assoc
        self.prm = np.array([lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, 0, 0, 0, 0, 0, 0], np.int64)
        self._bufs = None
        rng = (seed * 0x9E3779B97F4A7C15 | 1) & (2**64 - 1)
        frng = (rng ^ 0x5851F42D4C957F2D) | 1
        fn = nb if ccc else 1
        self.st = np.array([0, 0, rng - 2**64 if rng >= 2**63 else rng, frng - 2**64 if frng >= 2**63 else frng, 0,
                            -1, -1, fn], np.int64)  # fmt: skip
        self.tags = np.full(nb, -1, np.int64)
        self.stamp = np.zeros(nb, np.int64)
        self.dirty = np.zeros(nb, np.uint8)
        self.plru = np.zeros(max(nsets * (assoc - 1), 1), np.uint8)
        hsize = _pow2_at_least(2 * nb + 2) if assoc >= HASH_MIN_ASSOC else 1
        self.hkeys = np.full(hsize, -1, np.int64)
        self.hvals = np.zeros(hsize, np.int64)
        self.flink = np.full(2 * fn, -1, np.int64)  # prev/next of each shadow slot (LRU/FIFO shadow)
        self.ffree = np.arange(fn - 1, -1, -1, dtype=np.int64)  # free shadow slots, a stack
        self.ftags = np.full(fn, -1, np.int64)
        self.fstamp = np.zeros(fn, np.int64)
        self.fplru = np.zeros(max(fn - 1, 1), np.uint8)
        fhsize = _pow2_at_least(2 * fn + 2) if ccc else 1
        self.fhkeys = np.full(fhsize, -1, np.int64)
        self.fhvals = np.zeros(fhsize, np.int64)
        self.seen = np.full(4096 if ccc else 2, -1, np.int64)
        self.cnt = np.zeros(NCOUNTERS, np.int64)
        self._state = self._state_arrays()

    def _state_arrays(self) -> tuple:
        """The state in the order the core takes it."""
        return (
            self.prm, self.st, self.tags, self.stamp, self.dirty, self.plru, self.hkeys, self.hvals, self.flink,
            self.ffree, self.ftags, self.fstamp, self.fplru, self.fhkeys, self.fhvals, self.seen, self.cnt,
        )  # fmt: skip

    def partition(self, shift: int, mask: int, pid: int) -> None:
        """Own only blocks with ``(address >> shift) & mask == pid`` (a slice of the sets, for parallel runs)."""
        self.prm[10], self.prm[11], self.prm[12] = shift, mask, pid

    def run(self, types, addrs, sizes, origin, emit: bool, origin_offset: int = 0, side: int = 0):
        """Run a stream (state carries over between calls). Returns the downstream (types, addrs, sizes,
        origin); these may be views of buffers reused by the next call. ``origin_offset`` is added to event
        indexes when ``origin`` is empty. ``side`` 1 takes only instruction fetches and invalidates from the
        stream, 2 everything else and invalidates (Dinero's routing), 0 every event."""
        n = len(types)
        self.prm[8] = 1 if emit else 0
        self.prm[9] = origin_offset
        self.prm[13] = side
        nb = int(self.prm[1] * self.prm[2])
        if emit:
            want = max(3 * n, nb + 1) + 64
            if self._bufs is None or len(self._bufs[0]) < want:
                self._bufs = _new_bufs(want)
            bufs = self._bufs
        else:
            bufs = _new_bufs(1)
        parts = []
        fast = not self.prm[7] and self.prm[2] < HASH_MIN_ASSOC
        general = not fast
        stream = (types, addrs, sizes, origin)
        state = self._state
        e = 0
        k = 0
        while e < n:
            stop = n if not fast else e + 1
            e, k, reason = _core.run(general, stream, e, stop, k, state, bufs)
            if reason == OUT_FULL:  # keep what was written; continue in a fresh, bigger buffer
                parts.append(tuple(b[:k].copy() for b in bufs))
                bufs = _new_bufs(2 * len(bufs[0]) + 3 * nb + 64)
                self._bufs = bufs
                k = 0
            elif reason == SEEN_FULL:
                new = np.full(2 * len(self.seen), -1, np.int64)
                _core.rehash(self.seen, new)
                self.seen = new
                self._state = state = self._state_arrays()
            # a special event goes to the general kernel; it hands back once that event is done
            general = (not fast) or reason == SPECIAL or (general and reason != 0)
        last = tuple(b[:k] for b in bufs)
        if not parts:
            return last
        parts.append(last)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def _new_bufs(cap: int):
    return (np.empty(cap, np.int8), np.empty(cap, np.uint64), np.empty(cap, np.uint32), np.empty(cap, np.int64))


def run_cache(types, addrs, sizes, origin, lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed, emit):
    """Run one cache over an event stream.

    ``types`` int8, ``addrs`` uint64, ``sizes`` uint16 or uint32, ``origin`` int64 (the top-level trace index of
    each event; empty means "the event index"). Policies: ``repl`` 0 LRU, 1 FIFO, 2 random, 3 tree PLRU;
    ``walloc`` 0 always, 1 never, 2 nofetch; ``wback`` 0 always, 1 never (write-through), 2 nofetch;
    ``ralloc`` 1 allocate on read misses, 0 read-through. ``emit`` 0 counts downstream bytes without
    storing the downstream events.

    Returns ``(counters, out_types, out_addrs, out_sizes, out_origin)``.
    """
    state = CacheState(lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed)
    t, a, s, o = state.run(types, addrs, sizes, origin, bool(emit))
    return state.cnt, t, a, s, o
