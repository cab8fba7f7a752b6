"""numba kernels: run one cache over an event stream with Dinero IV's accounting.

Two compiled kernels serve every policy, the policies arriving as small integers (one compilation each,
cached on disk with ``cache=True``): :func:`_run` handles everything; :func:`_run_fast` is a small copy of
the common case (LRU or FIFO, no 3C shadow, up to 32 ways, demand references) that stays fast, and hands
copy-back and invalidate events to :func:`_run`. Both work on the same state, kept by :class:`CacheState`,
and are resumable: they stop when an output buffer could overflow rather than reallocate in the loop.

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

For parallel runs a state can own a slice of the sets (:meth:`CacheState.partition`); it then skips every
piece of a reference that belongs to another slice.
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
def _put(otypes, oaddrs, osizes, oorig, k, t, addr, size, org):
    """Append one downstream event at ``k``; returns the next free index."""
    otypes[k] = t
    oaddrs[k] = addr
    osizes[k] = size
    oorig[k] = org
    return k + 1


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
def _unlink(flink, w, head, tail):
    prv = flink[2 * w]
    nxt = flink[2 * w + 1]
    if prv >= 0:
        flink[2 * prv + 1] = nxt
    else:
        head = nxt
    if nxt >= 0:
        flink[2 * nxt] = prv
    else:
        tail = prv
    return head, tail


@numba.njit(cache=True)
def _push_front(flink, w, head, tail):
    flink[2 * w] = -1
    flink[2 * w + 1] = head
    if head >= 0:
        flink[2 * head] = w
    else:
        tail = w
    return w, tail


# scalar state slots (int64 array ``st``)
ST_CLK, ST_FCLK, ST_RNG, ST_FRNG, ST_NSEEN, ST_FHEAD, ST_FTAIL, ST_NFREE = 0, 1, 2, 3, 4, 5, 6, 7
# why the kernel stopped
DONE, OUT_FULL, SEEN_FULL = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _run(types, addrs, sizes, origin, start, stop, k0, prm, st, tags, stamp, dirty, plru, hkeys, hvals, flink, ffree,
         ftags, fstamp,
         fplru, fhkeys, fhvals, seen, cnt, otypes, oaddrs, osizes, oorig):  # fmt: skip
    """Process events from ``start`` until the end or until an output/seen buffer could overflow.

    Returns ``(next event index, events written, reason)``; the caller drains or grows buffers and resumes.
    No array is reallocated in here, which keeps the loop free of reference counting.
    """
    lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, emit = (
        prm[0], prm[1], prm[2], prm[3], prm[4], prm[5], prm[6], prm[7], prm[8],
    )  # fmt: skip
    bsize = np.int64(1) << lgb
    boff = np.uint64(bsize - 1)
    ulgb = np.uint64(lgb)
    upshift = np.uint64(prm[10])  # set partition (parallel runs): this run owns blocks whose
    upmask = np.uint64(prm[11])  # (address >> shift) & mask equals id
    upid = np.uint64(prm[12])
    smask = nsets - 1
    nb = nsets * assoc
    cap = len(otypes)
    use_hash = assoc >= HASH_MIN_ASSOC
    hmask = len(hkeys) - 1
    fn = len(ftags)
    fhmask = len(fhkeys) - 1
    smask2 = len(seen) - 1
    seen_cap = len(seen) // 2
    dways = np.zeros(assoc, np.int64)
    dstamp = np.zeros(assoc, np.int64)
    clk = st[ST_CLK]
    fclk = st[ST_FCLK]
    rng = np.uint64(st[ST_RNG])
    frng = np.uint64(st[ST_FRNG])
    nseen = st[ST_NSEEN]
    # the 3C shadow under LRU/FIFO is a doubly linked list (most recent first) plus a stack of free slots
    listed = repl < 2
    fhead = st[ST_FHEAD]
    ftail = st[ST_FTAIL]
    nfree = st[ST_NFREE]
    has_origin = len(origin) > 0
    k = k0
    reason = DONE
    e = start
    while e < stop:
        t = types[e]
        a = addrs[e]
        sz = np.int64(sizes[e])
        org = origin[e] if has_origin else prm[9] + e
        if t == 4 or t == 5:
            need = nb + 1 if (t == 4 and sz == 0) else 2
        else:
            need = 3 * (np.int64((a + np.uint64(sz - 1)) >> ulgb) - np.int64(a >> ulgb) + 1)
        if emit and k + need > cap:
            reason = OUT_FULL  # the caller keeps what is written and continues in a bigger buffer
            break
        if ccc and t < 4 and nseen + need > seen_cap:
            reason = SEEN_FULL
            break
        if t >= 4 and sz > 0 and ((a >> upshift) & upmask) != upid:  # another partition's block
            e += 1
            continue
        if t == 4:  # copy-back: write dirty blocks back, then pass the copy-back on
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
                            k = _put(
                                otypes, oaddrs, osizes, oorig, k, 1, np.uint64(tags[base + best]) << ulgb, bsize, org
                            )
            else:
                blk = np.int64(a >> ulgb)
                base = (blk & smask) * assoc
                w = _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask)
                if w >= 0 and dirty[base + w] != 0:
                    dirty[base + w] = 0
                    cnt[COPYBACK_BLOCKS] += 1
                    cnt[COPYBACK_BYTES] += bsize
                    cnt[BYTES_WRITTEN] += bsize
                    if emit:
                        k = _put(otypes, oaddrs, osizes, oorig, k, 1, np.uint64(blk) << ulgb, bsize, org)
            if emit:
                k = _put(otypes, oaddrs, osizes, oorig, k, 4, a, sz, org)
            e += 1
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
                    fhead = -1
                    ftail = -1
                    nfree = fn
                    for i in range(fn):
                        ffree[i] = fn - 1 - i
            else:
                blk = np.int64(a >> ulgb)
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
                        if listed:
                            fhead, ftail = _unlink(flink, fw, fhead, ftail)
                            ffree[nfree] = fw
                            nfree += 1
            if emit:
                k = _put(otypes, oaddrs, osizes, oorig, k, 5, a, sz, org)
            e += 1
            continue

        # demand reference: split at block boundaries, pieces in address order
        pa = a
        remaining = sz
        is_write = t == 1
        while True:
            blk = np.int64(pa >> ulgb)
            last = np.int64((pa + np.uint64(remaining - 1)) >> ulgb)
            mine = ((pa >> upshift) & upmask) == upid
            if last != blk:
                psz = bsize - np.int64(pa & boff)
                if mine:
                    cnt[MULTIBLOCK] += 1
            else:
                psz = remaining
            if mine:
                base = (blk & smask) * assoc
                w = _lookup(tags, base, assoc, blk, use_hash, hkeys, hvals, hmask)
                hit = w >= 0
                walloc_ok = is_write and (walloc == 0 or (walloc == 2 and psz == bsize))
                cnt[FETCH + t] += 1
                if not hit:
                    cnt[MISS + t] += 1
                update = (hit or walloc_ok) if is_write else (hit or ralloc != 0)
                wb = False
                victim = np.int64(-1)
                if update:
                    clk += 1
                    if hit:
                        if repl != 1:
                            stamp[base + w] = clk
                        if repl == 3:
                            _plru_touch(plru, (blk & smask) * (assoc - 1), assoc, w)
                    else:
                        pbase = (blk & smask) * (assoc - 1)
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
                    fupdate = (fhit or walloc_ok) if is_write else (fhit or ralloc != 0)
                    if fupdate and listed:
                        if fhit:
                            if repl == 0 and fw != fhead:
                                fhead, ftail = _unlink(flink, fw, fhead, ftail)
                                fhead, ftail = _push_front(flink, fw, fhead, ftail)
                        else:
                            if nfree > 0:
                                nfree -= 1
                                fw = ffree[nfree]
                            else:
                                fw = ftail
                                fhead, ftail = _unlink(flink, fw, fhead, ftail)
                                _hdel(fhkeys, fhvals, fhmask, ftags[fw])
                            ftags[fw] = blk
                            fhead, ftail = _push_front(flink, fw, fhead, ftail)
                            _hput(fhkeys, fhvals, fhmask, blk, fw)
                    elif fupdate:
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
                        elif _hfind(seen, seen, smask2, blk) != -1:
                            cnt[CAP + t] += 1
                        else:
                            cnt[COMP + t] += 1
                            _hput(seen, seen, smask2, blk, blk)
                            nseen += 1
                # downstream, in Dinero's order: fill read, write-through, victim write-back
                if not hit and (not is_write or (walloc_ok and psz != bsize)):
                    cnt[FILLS] += 1
                    cnt[BYTES_READ] += bsize
                    if emit:
                        k = _put(
                            otypes, oaddrs, osizes, oorig, k, 0 if is_write else t, np.uint64(blk) << ulgb, bsize, org
                        )
                if is_write and not wb:
                    cnt[WRITETHROUGHS] += 1
                    cnt[BYTES_WRITTEN] += psz
                    if emit:
                        k = _put(otypes, oaddrs, osizes, oorig, k, 1, pa, psz, org)
                if victim >= 0:
                    cnt[WRITEBACKS] += 1
                    cnt[BYTES_WRITTEN] += bsize
                    if emit:
                        k = _put(otypes, oaddrs, osizes, oorig, k, 1, np.uint64(victim) << ulgb, bsize, org)
            if last == blk:
                break
            pa = np.uint64(blk + 1) << ulgb
            remaining -= psz
        e += 1
    st[ST_CLK] = clk
    st[ST_FCLK] = fclk
    st[ST_RNG] = np.int64(rng)
    st[ST_FRNG] = np.int64(frng)
    st[ST_NSEEN] = nseen
    st[ST_FHEAD] = fhead
    st[ST_FTAIL] = ftail
    st[ST_NFREE] = nfree
    return e, k, reason


SPECIAL = 3


@numba.njit(cache=True, nogil=True)
def _run_fast(types, addrs, sizes, origin, start, k0, prm, st, tags, stamp, dirty, plru, cnt, otypes, oaddrs, osizes,
              oorig):  # fmt: skip
    """The common case, kept small so it stays fast: no 3C shadow, up to 32 ways, demand references.

    Same rules and output as :func:`_run`; stops with ``SPECIAL`` at a copy-back or invalidate event, which the
    caller hands to :func:`_run`. Shares the state arrays with it.
    """
    lgb, nsets, assoc, repl, walloc, wback, ralloc, emit = (
        prm[0], prm[1], prm[2], prm[3], prm[4], prm[5], prm[6], prm[8],
    )  # fmt: skip
    n = len(types)
    bsize = np.int64(1) << lgb
    boff = np.uint64(bsize - 1)
    ulgb = np.uint64(lgb)
    upshift = np.uint64(prm[10])  # set partition (parallel runs): this run owns blocks whose
    upmask = np.uint64(prm[11])  # (address >> shift) & mask equals id
    upid = np.uint64(prm[12])
    smask = nsets - 1
    cap = len(otypes)
    lru = repl == 0
    stamped = repl != 1  # FIFO keeps insertion times; the others record the last use
    tree = repl == 3
    rng = np.uint64(st[ST_RNG])
    wt = wback == 1
    nfills = np.int64(0)  # counted locally, added to cnt on the way out
    nwbacks = np.int64(0)
    clk = st[ST_CLK]
    lastblk = np.int64(-1)  # the block of the previous access and its slot (a one-entry lookup cache)
    lastslot = np.int64(0)
    has_origin = len(origin) > 0
    k = k0
    reason = DONE
    e = start
    while e < n:
        t = types[e]
        if t >= 4:
            reason = SPECIAL
            break
        a = addrs[e]
        sz = np.int64(sizes[e])
        single = np.int64(a & boff) + sz <= bsize
        if emit:
            need = 3 if single else 3 * (np.int64((a + np.uint64(sz - 1)) >> ulgb) - np.int64(a >> ulgb) + 1)
            if k + need > cap:
                reason = OUT_FULL
                break
        is_write = t == 1
        if single and ((a >> upshift) & upmask) != upid:  # another partition's block
            e += 1
            continue
        known_miss = False
        if single and not (wt and is_write):  # hot path: a hit needs no downstream traffic
            blk = np.int64(a >> ulgb)
            if blk == lastblk:
                slot = lastslot
            else:
                slot = -1
                base = (blk & smask) * assoc
                for j in range(assoc):
                    if tags[base + j] == blk:
                        slot = base + j
                        break
            if slot >= 0:
                cnt[FETCH + t] += 1
                clk += 1
                if stamped:
                    stamp[slot] = clk
                if tree:
                    s_ = blk & smask
                    _plru_touch(plru, s_ * (assoc - 1), assoc, slot - s_ * assoc)
                dirty[slot] |= np.uint8(is_write)  # no branch on the access type
                lastblk = blk
                lastslot = slot
                e += 1
                continue
            known_miss = True  # searched just now: the piece loop need not search again
        org = origin[e] if has_origin else prm[9] + e
        pa = a
        remaining = sz
        while True:
            blk = np.int64(pa >> ulgb)
            mine = ((pa >> upshift) & upmask) == upid
            if single:
                psz = remaining
            else:
                last = np.int64((pa + np.uint64(remaining - 1)) >> ulgb)
                if last != blk:
                    psz = bsize - np.int64(pa & boff)
                    if mine:
                        cnt[MULTIBLOCK] += 1
                else:
                    psz = remaining
                    single = True
            if mine:
                base = (blk & smask) * assoc
                if blk == lastblk:  # same block as the previous access: it is still where we left it
                    w = lastslot - base
                else:
                    w = -1
                    if not known_miss:
                        for j in range(assoc):
                            if tags[base + j] == blk:
                                w = j
                                break
                cnt[FETCH + t] += 1
                victim = np.int64(-1)
                wb = False
                walloc_ok = False
                if w >= 0:
                    clk += 1
                    if stamped:
                        stamp[base + w] = clk
                    if tree:
                        _plru_touch(plru, (blk & smask) * (assoc - 1), assoc, w)
                    if is_write:
                        wb = wback != 1
                        if wb:
                            dirty[base + w] = 1
                    lastblk = blk
                    lastslot = base + w
                else:
                    cnt[MISS + t] += 1
                    lastblk = -1
                    walloc_ok = is_write and (walloc == 0 or (walloc == 2 and psz == bsize))
                    if walloc_ok if is_write else ralloc != 0:
                        clk += 1
                        # least recent (LRU) or oldest (FIFO); invalid ways have stamp 0, so they go first
                        v = 0
                        bs = stamp[base]
                        for j in range(1, assoc):  # branch-free minimum (selects, no mispredictions)
                            sj = stamp[base + j]
                            less = sj < bs
                            bs = sj if less else bs
                            v = j if less else v
                        if bs != 0 and not lru and stamped:  # set full: random or tree pseudo-LRU
                            if tree:
                                pb = (blk & smask) * (assoc - 1)
                                node = 0
                                while node < assoc - 1:
                                    node = 2 * node + 1 + plru[pb + node]
                                v = node - (assoc - 1)
                            else:
                                rng ^= rng << np.uint64(13)
                                rng ^= rng >> np.uint64(7)
                                rng ^= rng << np.uint64(17)
                                v = np.int64(rng % np.uint64(assoc))
                        if dirty[base + v] != 0:  # (invalid ways are never dirty)
                            victim = tags[base + v]
                        tags[base + v] = blk
                        stamp[base + v] = clk
                        if tree:
                            _plru_touch(plru, (blk & smask) * (assoc - 1), assoc, v)
                        lastblk = blk
                        lastslot = base + v
                        wb = is_write and not wt
                        dirty[base + v] = np.uint8(wb)
                    if not is_write or (walloc_ok and psz != bsize):
                        nfills += 1
                        if emit:
                            k = _put(
                                otypes,
                                oaddrs,
                                osizes,
                                oorig,
                                k,
                                0 if is_write else t,
                                np.uint64(blk) << ulgb,
                                bsize,
                                org,
                            )
                if is_write and not wb:
                    cnt[WRITETHROUGHS] += 1
                    cnt[BYTES_WRITTEN] += psz
                    if emit:
                        k = _put(otypes, oaddrs, osizes, oorig, k, 1, pa, psz, org)
                if victim >= 0:
                    nwbacks += 1
                    if emit:
                        k = _put(otypes, oaddrs, osizes, oorig, k, 1, np.uint64(victim) << ulgb, bsize, org)
            if single:
                break
            pa = np.uint64(blk + 1) << ulgb
            remaining -= psz
        e += 1
    st[ST_CLK] = clk
    st[ST_RNG] = np.int64(rng)
    cnt[FILLS] += nfills
    cnt[BYTES_READ] += nfills * bsize
    cnt[WRITEBACKS] += nwbacks
    cnt[BYTES_WRITTEN] += nwbacks * bsize
    return e, k, reason


@numba.njit(cache=True)
def _rehash(old, new):
    mask = len(new) - 1
    for key in old:
        if key != -1:
            _hput(new, new, mask, key, key)


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


class CacheState:
    """The state of one simulated cache between kernel calls (flat arrays plus a few scalars)."""

    def __init__(self, lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed):
        nb = nsets * assoc
        self.prm = np.array([lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, 0, 0, 0, 0, 0], np.int64)
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

    def partition(self, shift: int, mask: int, pid: int) -> None:
        """Own only blocks with ``(address >> shift) & mask == pid`` (a slice of the sets, for parallel runs)."""
        self.prm[10], self.prm[11], self.prm[12] = shift, mask, pid

    def run(self, types, addrs, sizes, origin, emit: bool, origin_offset: int = 0):
        """Run a stream (state carries over between calls). Returns the downstream (types, addrs, sizes,
        origin); these may be views of buffers reused by the next call. ``origin_offset`` is added to event
        indexes when ``origin`` is empty."""
        n = len(types)
        self.prm[8] = 1 if emit else 0
        self.prm[9] = origin_offset
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
        e = 0
        k = 0
        while e < n:
            if general:
                stop = n if not fast else e + 1
                e, k, reason = _run(types, addrs, sizes, origin, e, stop, k, self.prm, self.st, self.tags,
                                    self.stamp, self.dirty, self.plru, self.hkeys, self.hvals, self.flink,
                                    self.ffree, self.ftags,
                                    self.fstamp, self.fplru, self.fhkeys, self.fhvals, self.seen, self.cnt,
                                    *bufs)  # fmt: skip
            else:
                e, k, reason = _run_fast(types, addrs, sizes, origin, e, k, self.prm, self.st, self.tags,
                                         self.stamp, self.dirty, self.plru, self.cnt, *bufs)  # fmt: skip
            if reason == OUT_FULL:  # keep what was written; continue in a fresh, bigger buffer
                parts.append(tuple(b[:k].copy() for b in bufs))
                bufs = _new_bufs(2 * len(bufs[0]) + 3 * nb + 64)
                self._bufs = bufs
                k = 0
            elif reason == SEEN_FULL:
                new = np.full(2 * len(self.seen), -1, np.int64)
                _rehash(self.seen, new)
                self.seen = new
            # a special event goes to the general kernel; it hands back once that event is done
            general = (not fast) or reason == SPECIAL or (general and reason != DONE)
        last = tuple(b[:k] for b in bufs)
        if not parts:
            return last
        parts.append(last)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def _new_bufs(cap: int):
    return (np.empty(cap, np.int8), np.empty(cap, np.uint64), np.empty(cap, np.uint32), np.empty(cap, np.int64))


def run_cache(types, addrs, sizes, origin, lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed, emit):
    """Run one cache over an event stream.

    ``types`` int8, ``addrs`` uint64, ``sizes`` uint32, ``origin`` int64 (the top-level trace index of
    each event; empty means "the event index"). Policies: ``repl`` 0 LRU, 1 FIFO, 2 random, 3 tree PLRU;
    ``walloc`` 0 always, 1 never, 2 nofetch; ``wback`` 0 always, 1 never (write-through), 2 nofetch;
    ``ralloc`` 1 allocate on read misses, 0 read-through. ``emit`` 0 counts downstream bytes without
    storing the downstream events.

    Returns ``(counters, out_types, out_addrs, out_sizes, out_origin)``.
    """
    state = CacheState(lgb, nsets, assoc, repl, walloc, wback, ralloc, ccc, seed)
    t, a, s, o = state.run(types, addrs, sizes, origin, bool(emit))
    return state.cnt, t, a, s, o
