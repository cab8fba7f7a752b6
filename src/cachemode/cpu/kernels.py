"""numba kernels: run one cache over an event stream with Dinero IV's accounting.

One compiled kernel, :func:`run_cache`, serves every policy: the policies arrive as small integers, so the
test suite and the CLI pay for one compilation (cached on disk with ``cache=True``).

State is flat arrays: ``tags[set * assoc + way]`` holds the block number (-1 when invalid), ``stamp`` the
last use (LRU) or the insertion time (FIFO), ``dirty`` a byte, ``plru`` the tree bits (assoc - 1 per set).
Caches with many ways (and the fully associative shadow cache used for 3C classification) also keep an
open-addressing hash from block number to slot, so a lookup does not scan every way.

For each input event the kernel emits the downstream events in Dinero's order: for every piece of a
reference (a reference that crosses a block boundary is split, the remainder handled last, as a separate
demand fetch of the same type) the fill read, then the write-through, then the victim write-back. A
copy-back event (type 4) writes dirty blocks back (whole cache when its size is 0: sets from last to first,
within a set least recently used first, as Dinero's pending stack pops them) and is passed on; an invalidate
(type 5) drops blocks without writing them back and is passed on.
"""

from __future__ import annotations

import numba
import numpy as np

# counter layout (int64 array)
FETCH = 0  # 0..3: read, write, ifetch, misc
MISS = 4
COMP = 8
CAP = 12
CONF = 16
MULTIBLOCK = 20
BYTES_READ = 21
BYTES_WRITTEN = 22
WRITEBACKS = 23  # dirty victims written back on eviction
COPYBACK_BLOCKS = 24  # dirty blocks written by copy-back events (end of run, flushes)
COPYBACK_BYTES = 25
WRITETHROUGHS = 26
FILLS = 27
INVALIDATED_DIRTY = 28  # dirty blocks dropped by an invalidate
NCOUNTERS = 32

HASH_MIN_ASSOC = 33  # caches with more ways than this use the block -> slot hash


@numba.njit(cache=True, inline="always")
def _hslot(key, hmask):
    x = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((x >> np.uint64(29)) & np.uint64(hmask))


@numba.njit(cache=True)
def _hfind(hkeys, hvals, hmask, key):
    i = _hslot(key, hmask)
    while True:
        k = hkeys[i]
        if k == key:
            return hvals[i]
        if k == -1:
            return -1
        i = (i + 1) & hmask


@numba.njit(cache=True)
def _hput(hkeys, hvals, hmask, key, val):
    i = _hslot(key, hmask)
    while hkeys[i] != -1 and hkeys[i] != key:
        i = (i + 1) & hmask
    hkeys[i] = key
    hvals[i] = val


@numba.njit(cache=True)
def _hdel(hkeys, hvals, hmask, key):
    i = _hslot(key, hmask)
    while True:
        k = hkeys[i]
        if k == -1:
            return
        if k == key:
            break
        i = (i + 1) & hmask
    j = i
    while True:
        j = (j + 1) & hmask
        k = hkeys[j]
        if k == -1:
            break
        h = _hslot(k, hmask)
        # move k back into the hole at i unless its home lies cyclically in (i, j]
        stay = i < h <= j if i <= j else h > i or h <= j
        if not stay:
            hkeys[i] = k
            hvals[i] = hvals[j]
            i = j
    hkeys[i] = -1


@numba.njit(cache=True)
def _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask):
    if use_hash:
        slot = _hfind(hkeys, hvals, hmask, blk)
        if slot < 0:
            return -1
        return slot - base
    for w in range(assoc):
        if tags[base + w] == blk:
            return w
    return -1


@numba.njit(cache=True)
def _plru_touch(plru, pbase, assoc, w):
    node = w + assoc - 1
    while node > 0:
        parent = (node - 1) >> 1
        if node == 2 * parent + 1:
            plru[pbase + parent] = 1  # used the left half: next victim on the right
        else:
            plru[pbase + parent] = 0
        node = parent


@numba.njit(cache=True)
def _victim(tags, stamp, plru, base, pbase, assoc, repl, rng):
    """Pick the way to fill: an invalid way if any, else by policy. Returns (way, rng)."""
    for w in range(assoc):
        if tags[base + w] < 0:
            return w, rng
    if repl == 2:  # random (xorshift64)
        rng ^= rng << np.uint64(13)
        rng ^= rng >> np.uint64(7)
        rng ^= rng << np.uint64(17)
        return np.int64(rng % np.uint64(assoc)), rng
    if repl == 3:  # tree pseudo-LRU
        node = 0
        while node < assoc - 1:
            node = 2 * node + 1 + plru[pbase + node]
        return node - (assoc - 1), rng
    best = 0
    bs = stamp[base]
    for w in range(1, assoc):
        if stamp[base + w] < bs:
            bs = stamp[base + w]
            best = w
    return best, rng


@numba.njit(cache=True)
def _grow(otypes, oaddrs, osizes, oorig, k, need):
    cap = len(otypes)
    if k + need <= cap:
        return otypes, oaddrs, osizes, oorig
    cap2 = max(cap * 2, k + need + 1024)
    t2 = np.empty(cap2, np.int8)
    a2 = np.empty(cap2, np.uint64)
    s2 = np.empty(cap2, np.uint32)
    o2 = np.empty(cap2, np.int64)
    t2[:k] = otypes[:k]
    a2[:k] = oaddrs[:k]
    s2[:k] = osizes[:k]
    o2[:k] = oorig[:k]
    return t2, a2, s2, o2


@numba.njit(cache=True, nogil=True)
def run_cache(types, addrs, sizes, origin, lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed, emit):
    """Run one cache over an event stream.

    ``types`` int8, ``addrs`` uint64, ``sizes`` uint32, ``origin`` int64 (the top-level trace index of
    each event; empty means "the event index"). Policies: ``repl`` 0 LRU, 1 FIFO, 2 random, 3 tree PLRU;
    ``walloc`` 0 always, 1 never, 2 nofetch; ``wback`` 0 always, 1 never (write-through), 2 nofetch;
    ``ralloc`` 1 allocate on read misses, 0 read-through. ``emit`` 0 counts downstream bytes without
    storing the downstream events.

    Returns ``(counters, out_types, out_addrs, out_sizes, out_origin)``.
    """
    n = len(types)
    bsize = np.int64(1) << lgb
    boff = np.uint64(bsize - 1)
    smask = nsets - 1
    nb = nsets * assoc
    cnt = np.zeros(NCOUNTERS, np.int64)
    tags = np.full(nb, -1, np.int64)
    stamp = np.zeros(nb, np.int64)
    dirty = np.zeros(nb, np.uint8)
    plru = np.zeros(max(nsets * (assoc - 1), 1), np.uint8)
    dways = np.zeros(assoc, np.int64)
    dstamp = np.zeros(assoc, np.int64)
    use_hash = assoc >= HASH_MIN_ASSOC
    hsize = 1
    while hsize < 2 * nb + 2:
        hsize *= 2
    if not use_hash:
        hsize = 1
    hkeys = np.full(hsize, -1, np.int64)
    hvals = np.zeros(hsize, np.int64)
    hmask = hsize - 1
    # 3C shadow: fully associative, same number of blocks, same policies; plus the set of blocks seen
    fn = nb if ccc else 1
    ftags = np.full(fn, -1, np.int64)
    fstamp = np.zeros(fn, np.int64)
    fplru = np.zeros(max(fn - 1, 1), np.uint8)
    fhsize = 1
    while ccc and fhsize < 2 * fn + 2:
        fhsize *= 2
    fhkeys = np.full(fhsize, -1, np.int64)
    fhvals = np.zeros(fhsize, np.int64)
    fhmask = fhsize - 1
    seen_size = 1024 if ccc else 1
    seen = np.full(seen_size, -1, np.int64)
    seen_dummy = np.zeros(seen_size, np.int64)
    nseen = 0
    rng = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
    frng = rng ^ np.uint64(0x5851F42D4C957F2D) | np.uint64(1)
    clk = np.int64(0)
    fclk = np.int64(0)
    cap = n // 4 + 1024 if emit else 1
    otypes = np.empty(cap, np.int8)
    oaddrs = np.empty(cap, np.uint64)
    osizes = np.empty(cap, np.uint32)
    oorig = np.empty(cap, np.int64)
    k = 0
    has_origin = len(origin) > 0

    for e in range(n):
        t = types[e]
        a = addrs[e]
        sz = np.int64(sizes[e])
        org = origin[e] if has_origin else np.int64(e)
        if t == 4:  # copy-back: write dirty blocks back, then pass the copy-back on
            if emit:
                otypes, oaddrs, osizes, oorig = _grow(otypes, oaddrs, osizes, oorig, k, nb + 1)
            if sz == 0:
                for s in range(nsets - 1, -1, -1):
                    base = s * assoc
                    nd = 0
                    for w in range(assoc):
                        if tags[base + w] >= 0 and dirty[base + w] != 0:
                            dways[nd] = w
                            dstamp[nd] = stamp[base + w]
                            nd += 1
                    if nd == 0:
                        continue
                    order = np.argsort(dstamp[:nd], kind="mergesort")  # least recent first
                    for j in range(nd):
                        best = dways[order[j]]
                        dirty[base + best] = 0
                        cnt[COPYBACK_BLOCKS] += 1
                        cnt[COPYBACK_BYTES] += bsize
                        cnt[BYTES_WRITTEN] += bsize
                        if emit:
                            otypes[k] = 1
                            oaddrs[k] = np.uint64(tags[base + best]) << np.uint64(lgb)
                            osizes[k] = bsize
                            oorig[k] = org
                            k += 1
            else:
                blk = np.int64(a >> np.uint64(lgb))
                base = (blk & smask) * assoc
                w = _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask)
                if w >= 0 and dirty[base + w] != 0:
                    dirty[base + w] = 0
                    cnt[COPYBACK_BLOCKS] += 1
                    cnt[COPYBACK_BYTES] += bsize
                    cnt[BYTES_WRITTEN] += bsize
                    if emit:
                        otypes[k] = 1
                        oaddrs[k] = np.uint64(blk) << np.uint64(lgb)
                        osizes[k] = bsize
                        oorig[k] = org
                        k += 1
            if emit:
                otypes[k] = 4
                oaddrs[k] = a
                osizes[k] = sz
                oorig[k] = org
                k += 1
            continue
        if t == 5:  # invalidate: drop blocks (no write-back), then pass the invalidate on
            if sz == 0:
                for i in range(nb):
                    if tags[i] >= 0 and dirty[i] != 0:
                        cnt[INVALIDATED_DIRTY] += 1
                    tags[i] = -1
                    dirty[i] = 0
                    stamp[i] = 0
                plru[:] = 0
                hkeys[:] = -1
                if ccc:
                    ftags[:] = -1
                    fstamp[:] = 0
                    fplru[:] = 0
                    fhkeys[:] = -1
                    seen[:] = -1
                    nseen = 0
            else:
                blk = np.int64(a >> np.uint64(lgb))
                base = (blk & smask) * assoc
                w = _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask)
                if w >= 0:
                    if dirty[base + w] != 0:
                        cnt[INVALIDATED_DIRTY] += 1
                    tags[base + w] = -1
                    dirty[base + w] = 0
                    stamp[base + w] = 0
                    if use_hash:
                        _hdel(hkeys, hvals, hmask, blk)
                if ccc:
                    fw = _hfind(fhkeys, fhvals, fhmask, blk)
                    if fw >= 0:
                        ftags[fw] = -1
                        fstamp[fw] = 0
                        _hdel(fhkeys, fhvals, fhmask, blk)
            if emit:
                otypes, oaddrs, osizes, oorig = _grow(otypes, oaddrs, osizes, oorig, k, 1)
                otypes[k] = 5
                oaddrs[k] = a
                osizes[k] = sz
                oorig[k] = org
                k += 1
            continue

        # demand reference: split at block boundaries, pieces in address order
        pa = a
        remaining = sz
        is_write = t == 1
        while True:
            blk = np.int64(pa >> np.uint64(lgb))
            last = np.int64((pa + np.uint64(remaining - 1)) >> np.uint64(lgb))
            if last != blk:
                psz = bsize - np.int64(pa & boff)
                cnt[MULTIBLOCK] += 1
            else:
                psz = remaining
            if emit:
                otypes, oaddrs, osizes, oorig = _grow(otypes, oaddrs, osizes, oorig, k, 3)
            base = (blk & smask) * assoc
            w = _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask)
            hit = w >= 0
            walloc_ok = is_write and (walloc == 0 or (walloc == 2 and psz == bsize))
            cnt[FETCH + t] += 1
            if not hit:
                cnt[MISS + t] += 1
            update = hit or walloc_ok if is_write else hit or ralloc != 0
            wb = False
            victim = np.int64(-1)
            if update:
                clk += 1
                if hit:
                    if repl != 1:
                        stamp[base + w] = clk
                    if repl == 3:
                        _plru_touch(plru, s_pbase(blk, smask, assoc), assoc, w)
                else:
                    pbase = s_pbase(blk, smask, assoc)
                    w, rng = _victim(tags, stamp, plru, base, pbase, assoc, repl, rng)
                    old = tags[base + w]
                    if old >= 0:
                        if dirty[base + w] != 0:
                            victim = old
                        if use_hash:
                            _hdel(hkeys, hvals, hmask, old)
                    tags[base + w] = blk
                    dirty[base + w] = 0
                    stamp[base + w] = clk
                    if use_hash:
                        _hput(hkeys, hvals, hmask, blk, base + w)
                    if repl == 3:
                        _plru_touch(plru, pbase, assoc, w)
                if is_write:
                    # wback "f" (nofetch): the affected block is valid once updated, so it always holds
                    wb = wback != 1
                    if wb:
                        dirty[base + w] = 1
            if ccc:
                fw = _hfind(fhkeys, fhvals, fhmask, blk)
                fhit = fw >= 0
                fupdate = fhit or walloc_ok if is_write else fhit or ralloc != 0
                if fupdate:
                    fclk += 1
                    if fhit:
                        if repl != 1:
                            fstamp[fw] = fclk
                        if repl == 3:
                            _plru_touch(fplru, 0, fn, fw)
                    else:
                        fw, frng = _victim(ftags, fstamp, fplru, 0, 0, fn, repl, frng)
                        old = ftags[fw]
                        if old >= 0:
                            _hdel(fhkeys, fhvals, fhmask, old)
                        ftags[fw] = blk
                        fstamp[fw] = fclk
                        _hput(fhkeys, fhvals, fhmask, blk, fw)
                        if repl == 3:
                            _plru_touch(fplru, 0, fn, fw)
                if not hit:
                    if fhit:
                        cnt[CONF + t] += 1
                    else:
                        smask2 = len(seen) - 1
                        if _hfind(seen, seen_dummy, smask2, blk) >= 0:
                            cnt[CAP + t] += 1
                        else:
                            cnt[COMP + t] += 1
                            if 2 * (nseen + 1) > len(seen):
                                seen2 = np.full(len(seen) * 2, -1, np.int64)
                                seen_dummy = np.zeros(len(seen) * 2, np.int64)
                                for key in seen:
                                    if key != -1:
                                        _hput(seen2, seen_dummy, len(seen2) - 1, key, 0)
                                seen = seen2
                            _hput(seen, seen_dummy, len(seen) - 1, blk, 0)
                            nseen += 1
            # downstream, in Dinero's order: fill read, write-through, victim write-back
            if not hit and (not is_write or (walloc_ok and psz != bsize)):
                cnt[FILLS] += 1
                cnt[BYTES_READ] += bsize
                if emit:
                    otypes[k] = 0 if is_write else t
                    oaddrs[k] = np.uint64(blk) << np.uint64(lgb)
                    osizes[k] = bsize
                    oorig[k] = org
                    k += 1
            if is_write and not wb:
                cnt[WRITETHROUGHS] += 1
                cnt[BYTES_WRITTEN] += psz
                if emit:
                    otypes[k] = 1
                    oaddrs[k] = pa
                    osizes[k] = psz
                    oorig[k] = org
                    k += 1
            if victim >= 0:
                cnt[WRITEBACKS] += 1
                cnt[BYTES_WRITTEN] += bsize
                if emit:
                    otypes[k] = 1
                    oaddrs[k] = np.uint64(victim) << np.uint64(lgb)
                    osizes[k] = bsize
                    oorig[k] = org
                    k += 1
            if last == blk:
                break
            pa = np.uint64(blk + 1) << np.uint64(lgb)
            remaining -= psz
    return cnt, otypes[:k], oaddrs[:k], osizes[:k], oorig[:k]


@numba.njit(cache=True, inline="always")
def s_pbase(blk, smask, assoc):
    return (blk & smask) * (assoc - 1)
