"""Building crash states fast: each state's image as runs of sectors taken from one shared pool.

A crash state is the base image plus the sectors its surviving writes change. Computing that sector by sector
in Python, and then hashing every changed byte to de-duplicate, cost ~25 ms per state on a log of 128 KiB
writes; here the work per state is a few NumPy slice assignments.

* The **pool** holds every sector any write of the log can leave whole, once: sector ``j`` of the pool is
  ``pool[j * sector : (j + 1) * sector]`` (its *source* number ``j``). Sectors that a state leaves patched by
  unaligned writes are computed when a state needs them and appended.
* Every source also has a **content id**: equal bytes, equal id (interned by exact bytes, not by hash), and
  knows whether it differs from the base sector under it (a write of what was there changes nothing). Two
  states are the same image exactly when they change the same sectors to the same content ids, so that list
  (16 bytes per sector, not 512) is the identity. A hash of it finds candidates and the lists are compared
  whole on a hit, so two different images are never merged.
* A state's image is an :class:`Overlay`: runs ``(disk sector, count, first source)`` over the pool. It is what
  travels to a worker (with the pool sent once); materialising it is one ``pwrite`` per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cachemode.lab.record import WRITE, WriteLog

BaseRead = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Overlay:
    """A crash state's sectors over the base: ``runs[k] = (disk sector, count, first pool source)``."""

    sector: int
    runs: np.ndarray  # int64, shape (R, 3)

    @property
    def sector_count(self) -> int:
        return int(self.runs[:, 1].sum()) if len(self.runs) else 0

    def pieces(self, pool: bytes | memoryview, size: int) -> Iterator[tuple[int, memoryview]]:
        """``(byte offset, data)`` per run, clipped at the end of a ``size``-byte disk."""
        view = memoryview(pool)
        s = self.sector
        for disk, count, src in self.runs.tolist():
            offset = disk * s
            length = min(count * s, size - offset)
            yield offset, view[src * s : src * s + length]

    def sectors(self, pool: bytes | memoryview, size: int) -> dict[int, bytes]:
        """Sector number -> content, one entry per changed sector (for in-process checkers and tests)."""
        out: dict[int, bytes] = {}
        s = self.sector
        for offset, data in self.pieces(pool, size):
            first = offset // s
            for k in range(0, len(data), s):
                out[first + k // s] = bytes(data[k : k + s])
        return out


class _Write:
    """One write of the log, precomputed: its whole sectors (as universe positions and sources), its partial ones."""

    __slots__ = ("first", "partial", "pos0", "pos1", "src0")

    def __init__(self, first: int, pos0: int, pos1: int, src0: int, partial: tuple[int, ...]) -> None:
        self.first = first  # first whole disk sector
        self.pos0, self.pos1 = pos0, pos1  # universe positions of the whole sectors
        self.src0 = src0  # pool source of the first whole sector (the rest follow)
        self.partial = partial  # disk sectors this write covers only in part


class StateBuilder:
    """Builds and de-duplicates crash states of one log at one tear granularity."""

    def __init__(self, log: WriteLog, sector: int, base_read: BaseRead) -> None:
        self.log = log
        self.sector = sector
        self.size = log.size
        self._base_read = base_read
        s = sector
        touched: set[int] = set()
        for e in log.entries:
            if e.is_write and e.length:
                touched.update(range(e.offset // s, (e.offset + e.length + s - 1) // s))
        self.universe = np.array(sorted(touched), dtype=np.int64)  # every disk sector some write touches
        pos_of = {d: p for p, d in enumerate(self.universe.tolist())}
        self._pos_of = pos_of
        chunks: list[bytes] = []
        cids: list[int] = []  # per source: its content id
        differs: list[bool] = []  # per source: whether it differs from the base under it
        self._intern: dict[bytes, int] = {}
        self.writes: dict[int, _Write] = {}
        self._touching: dict[int, list[int]] = {}  # partial sector -> writes touching it, in log order
        nsrc = 0
        for e in log.entries:
            if not (e.is_write and e.length):
                continue
            start, end = e.offset, e.offset + e.length
            lo_sec, hi_sec = start // s, (end + s - 1) // s
            whole = [d for d in range(lo_sec, hi_sec) if start <= d * s and min((d + 1) * s, self.size) <= end]
            partial = tuple(d for d in range(lo_sec, hi_sec) if not whole or d < whole[0] or d > whole[-1])
            w = _Write(whole[0] if whole else lo_sec, 0, 0, nsrc, partial)
            if whole:
                w.pos0, w.pos1 = pos_of[whole[0]], pos_of[whole[-1]] + 1
                a, b = whole[0] * s - start, min((whole[-1] + 1) * s, self.size) - start
                data = e.data[a:b] if e.kind == WRITE else bytes(b - a)
                data += bytes(-len(data) % s)  # a short last sector of the disk is padded in the pool
                chunks.append(data)
                for k in range(0, len(data), s):
                    cids.append(self._intern.setdefault(data[k : k + s], len(self._intern)))
                under = base_read(b - a, start + a)
                under += bytes(-len(under) % s)
                rows = len(data) // s
                differs.extend(
                    (np.frombuffer(data, np.uint8).reshape(rows, s) != np.frombuffer(under, np.uint8).reshape(rows, s))
                    .any(axis=1)
                    .tolist()
                )
                nsrc += len(whole)
            self.writes[e.index] = w
            for d in partial:
                self._touching.setdefault(d, []).append(e.index)
        for i, w in self.writes.items():  # a whole cover of a partially written sector matters too
            for d in range(w.first, w.first + w.pos1 - w.pos0):
                if d in self._touching:
                    self._touching[d].append(i)
        for d in self._touching:
            self._touching[d].sort()
        self._pool = bytearray(b"".join(chunks))
        self._cids = cids
        self._differs = differs
        self._cid_array = np.array(cids, dtype=np.int64)
        self._differs_array = np.array(differs, dtype=bool)
        self._seen: dict[int, list[np.ndarray]] = {}  # identity digest -> runs of the states built with it

    @property
    def pool(self) -> bytes:
        """Every pool sector, source ``j`` at byte ``j * sector`` (read it after building: patches append)."""
        return bytes(self._pool)

    def _source(self, content: bytes, under: bytes) -> int:
        """A pool source holding ``content`` (a new one appended for a patched sector over ``under``)."""
        src = len(self._cids)
        padded = content + bytes(-len(content) % self.sector)
        self._pool += padded
        self._cids.append(self._intern.setdefault(padded, len(self._intern)))
        self._differs.append(content != under)
        return src

    def image(self, state_writes: list[int], torn: dict[int, frozenset[int]]) -> np.ndarray:
        """Source per universe position (-1: the base), for the writes ``state_writes`` applied in log order."""
        img = np.full(len(self.universe), -1, dtype=np.int64)
        patched: set[int] = set()
        for i in state_writes:
            w = self.writes.get(i)
            if w is None:
                continue
            n = w.pos1 - w.pos0
            if i in torn:
                keep = torn[i]
                sel = [k for k in range(n) if w.first + k in keep]
                if sel:
                    ks = np.array(sel, dtype=np.int64)
                    img[w.pos0 + ks] = w.src0 + ks
                patched.update(d for d in w.partial if d in keep)
            else:
                if n:
                    img[w.pos0 : w.pos1] = np.arange(w.src0, w.src0 + n, dtype=np.int64)
                patched.update(w.partial)
        if patched:
            chosen = set(state_writes)
            for d in sorted(patched):
                self._patch(img, d, chosen, torn)
        return img

    def _patch(self, img: np.ndarray, d: int, chosen: set[int], torn: dict[int, frozenset[int]]) -> None:
        """Settle a sector some chosen write covers only in part: forward from its last whole cover, or the base."""
        s = self.sector
        start = d * s
        slen = min(s, self.size - start)
        lands = [i for i in self._touching[d] if i in chosen and (i not in torn or d in torn[i])]
        last_whole = max((k for k, i in enumerate(lands) if d not in self.writes[i].partial), default=-1)
        if last_whole == len(lands) - 1:
            return  # a whole write decided it last: the whole-sector pass already holds the answer
        if last_whole >= 0:
            w = self.writes[lands[last_whole]]
            src = w.src0 + (d - w.first)
            buf = bytearray(self._pool[src * s : src * s + slen])
        else:
            buf = bytearray(self._base_read(slen, start))
        for i in lands[last_whole + 1 :]:
            e = self.log.entries[i]
            lo, hi = max(start, e.offset), min(start + slen, e.offset + e.length)
            buf[lo - start : hi - start] = e.data[lo - e.offset : hi - e.offset] if e.kind == WRITE else bytes(hi - lo)
        img[self._pos_of[d]] = self._source(bytes(buf), self._base_read(slen, start))

    def build(
        self, durable: tuple[int, ...], kept: tuple[int, ...], torn: tuple[tuple[int, tuple[int, ...]], ...]
    ) -> Overlay | None:
        """The state's overlay, or None when an identical image was built before."""
        tmap = {i: frozenset(secs) for i, secs in torn}
        img = self.image(sorted({*durable, *kept, *tmap}), tmap)
        self._refresh()
        pos = np.flatnonzero(img >= 0)
        srcs = img[pos]
        changed = self._differs_array[srcs]  # a sector written with what the base holds is not a change
        disk, srcs = self.universe[pos[changed]], srcs[changed]
        ident = self._identity(disk, srcs)
        key = hash(ident.tobytes())  # only a bucket: a hit is compared whole
        same = self._seen.setdefault(key, [])
        if any(np.array_equal(ident, self._identity(*_expand(runs))) for runs in same):
            return None
        runs = _runs(disk, srcs)
        same.append(runs)
        return Overlay(self.sector, runs)

    def _refresh(self) -> None:
        """Bring the per-source arrays up to date with sources appended by patches."""
        if len(self._cid_array) < len(self._cids):
            self._cid_array = np.array(self._cids, dtype=np.int64)
            self._differs_array = np.array(self._differs, dtype=bool)

    def _identity(self, disk: np.ndarray, srcs: np.ndarray) -> np.ndarray:
        """What makes the image: each changed sector and its content id."""
        return np.concatenate((disk, self._cid_array[srcs]))


def _expand(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (disk sector, source) pairs a run list stands for."""
    counts = runs[:, 1]
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(runs[:, 0], counts) + within, np.repeat(runs[:, 2], counts) + within


def _runs(disk: np.ndarray, srcs: np.ndarray) -> np.ndarray:
    """Coalesce (disk sector, source) pairs into runs where both go up by one together."""
    if not len(disk):
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(disk) != 1) | (np.diff(srcs) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(disk)])))
    return np.stack((disk[starts], counts, srcs[starts]), axis=1)
