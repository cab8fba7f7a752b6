"""A slow, obvious model of one cache, written straight from the accounting rules, for cross-checking the kernel.

Rules (Dinero IV, plus the read-through and tree-PLRU extensions):
split at block boundaries (remainder later, counted as its own fetch, +1 multiblock per split); a write miss
that does not allocate, and a read miss under read-through, leave the cache untouched; LRU updates on every
hit (writes too), FIFO only on fill; a write that is not held dirty is written through with its own size; a
miss that is not a write, or an allocated partial write, fetches the whole block; downstream order is fill,
write-through, victim write-back; copy-back of the whole cache goes set by set from the last, least recently
used first.
"""

from __future__ import annotations


class RefCache:
    def __init__(self, size, bsize, assoc, repl="lru", walloc="a", wback="a", ralloc="a"):
        self.b = bsize
        self.assoc = assoc
        self.nsets = size // bsize // assoc
        self.repl = repl
        self.walloc = walloc
        self.wback = wback
        self.ralloc = ralloc
        # per set: list of [block, stamp, dirty]
        self.sets = [[] for _ in range(self.nsets)]
        self.plru = [[0] * max(assoc - 1, 1) for _ in range(self.nsets)]
        self.clock = 0
        self.fetch = [0] * 4
        self.miss = [0] * 4
        self.multiblock = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.out = []

    def _touch_plru(self, s, way):
        node = way + self.assoc - 1
        while node > 0:
            parent = (node - 1) // 2
            self.plru[s][parent] = 1 if node == 2 * parent + 1 else 0
            node = parent

    def _plru_victim(self, s):
        node = 0
        while node < self.assoc - 1:
            node = 2 * node + 1 + self.plru[s][node]
        return node - (self.assoc - 1)

    def access(self, t, addr, size):
        if t == 4:
            self.copyback()
            return
        pieces = []
        while True:
            blk = addr // self.b
            last = (addr + size - 1) // self.b
            if last != blk:
                psz = self.b - addr % self.b
                self.multiblock += 1
                pieces.append((addr, psz))
                addr, size = (blk + 1) * self.b, size - psz
            else:
                pieces.append((addr, size))
                break
        for pa, psz in pieces:
            self._piece(t, pa, psz)

    def _piece(self, t, pa, psz):
        blk = pa // self.b
        s = blk % self.nsets
        ways = self.sets[s]
        entry = next((e for e in ways if e[0] == blk), None)
        hit = entry is not None
        is_write = t == 1
        walloc = is_write and (self.walloc == "a" or (self.walloc == "f" and psz == self.b))
        self.fetch[t] += 1
        if not hit:
            self.miss[t] += 1
        update = (hit or walloc) if is_write else (hit or self.ralloc == "a")
        victim = None
        dirty_hold = False
        if update:
            self.clock += 1
            if hit:
                if self.repl != "fifo":
                    entry[1] = self.clock
                if self.repl == "plru":
                    self._touch_plru(s, entry[3])
            else:
                if len(ways) < self.assoc:
                    way = len(ways)
                else:
                    if self.repl == "plru":
                        way = self._plru_victim(s)
                        old = next(e for e in ways if e[3] == way)
                    else:
                        old = min(ways, key=lambda e: e[1])
                        way = old[3]
                    ways.remove(old)
                    if old[2]:
                        victim = old[0]
                entry = [blk, self.clock, False, way]
                ways.append(entry)
                if self.repl == "plru":
                    self._touch_plru(s, way)
            if is_write and self.wback != "n":
                entry[2] = True
                dirty_hold = True
        if not hit and (not is_write or (walloc and psz != self.b)):
            self.out.append((0 if is_write else t, blk * self.b, self.b))
            self.bytes_read += self.b
        if is_write and not dirty_hold:
            self.out.append((1, pa, psz))
            self.bytes_written += psz
        if victim is not None:
            self.out.append((1, victim * self.b, self.b))
            self.bytes_written += self.b

    def copyback(self):
        for s in range(self.nsets - 1, -1, -1):
            for e in sorted(self.sets[s], key=lambda e: e[1]):
                if e[2]:
                    e[2] = False
                    self.out.append((1, e[0] * self.b, self.b))
                    self.bytes_written += self.b
        self.out.append((4, 0, 0))
