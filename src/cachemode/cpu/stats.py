"""Per-cache statistics: counters from the kernels, as objects, dicts, JSON and a readable table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from cachemode.cpu import kernels as K
from cachemode.cpu.config import CacheConfig

ACCESS = ("read", "write", "ifetch", "misc")


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


@dataclass
class CacheStats:
    """Counters for one cache, with Dinero IV's meanings.

    ``fetches``/``misses`` and the 3C counts are per access type (read, write, ifetch, misc); each piece of a
    block-spanning reference counts as a fetch. ``bytes_read``/``bytes_written`` are bytes from and to the
    next level (memory for the last), end-of-run copy-back included.
    """

    name: str
    config: CacheConfig
    fetches: dict[str, int]
    misses: dict[str, int]
    compulsory: dict[str, int] | None
    capacity: dict[str, int] | None
    conflict: dict[str, int] | None
    multiblock: int
    bytes_read: int
    bytes_written: int
    writebacks: int
    copyback_blocks: int
    copyback_bytes: int
    writethroughs: int
    fills: int

    @classmethod
    def from_counters(cls, name: str, config: CacheConfig, cnt: np.ndarray) -> CacheStats:
        c = [int(x) for x in cnt]

        def per(off: int) -> dict[str, int]:
            return {t: c[off + i] for i, t in enumerate(ACCESS)}

        ccc = bool(config.ccc)
        return cls(
            name=name,
            config=config,
            fetches=per(K.FETCH),
            misses=per(K.MISS),
            compulsory=per(K.COMP) if ccc else None,
            capacity=per(K.CAP) if ccc else None,
            conflict=per(K.CONF) if ccc else None,
            multiblock=c[K.MULTIBLOCK],
            bytes_read=c[K.BYTES_READ],
            bytes_written=c[K.BYTES_WRITTEN],
            writebacks=c[K.WRITEBACKS],
            copyback_blocks=c[K.COPYBACK_BLOCKS],
            copyback_bytes=c[K.COPYBACK_BYTES],
            writethroughs=c[K.WRITETHROUGHS],
            fills=c[K.FILLS],
        )

    @property
    def total_fetches(self) -> int:
        return sum(self.fetches.values())

    @property
    def total_misses(self) -> int:
        return sum(self.misses.values())

    @property
    def miss_rate(self) -> float:
        return _ratio(self.total_misses, self.total_fetches)

    def miss_rates(self) -> dict[str, float]:
        return {t: _ratio(self.misses[t], self.fetches[t]) for t in ACCESS}

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "config": self.config.to_dict(),
            "fetches": dict(self.fetches, total=self.total_fetches),
            "misses": dict(self.misses, total=self.total_misses),
            "miss_rate": dict(self.miss_rates(), total=self.miss_rate),
            "multiblock_refs": self.multiblock,
            "bytes_from_next_level": self.bytes_read,
            "bytes_to_next_level": self.bytes_written,
            "dirty_evictions": self.writebacks,
            "copyback_blocks": self.copyback_blocks,
            "copyback_bytes": self.copyback_bytes,
            "writethroughs": self.writethroughs,
            "fills": self.fills,
        }
        if self.compulsory is not None:
            d["compulsory"] = dict(self.compulsory, total=sum(self.compulsory.values()))
            d["capacity"] = dict(self.capacity, total=sum(self.capacity.values()))
            d["conflict"] = dict(self.conflict, total=sum(self.conflict.values()))
        return d


@dataclass
class SimResult:
    """The outcome of one simulation: stats per cache in Dinero's print order."""

    caches: list[CacheStats] = field(default_factory=list)
    references: int = 0
    unrouted: dict[str, int] = field(default_factory=dict)  # see Simulation.unrouted

    def __getitem__(self, name: str) -> CacheStats:
        for c in self.caches:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = {"references": self.references, "caches": [c.to_dict() for c in self.caches]}
        if self.unrouted:
            d["references_to_no_cache"] = dict(self.unrouted)
        return d

    def warnings(self) -> list[str]:
        """One line per kind of reference that no cache received."""
        what = {"ifetch": ("instruction fetches", "i or u"), "data": ("data references", "d or u")}
        return [
            f"{n:,} {what[k][0]} reach no cache (the hierarchy has no {what[k][1]} cache): they go straight to "
            "memory, uncounted, as in Dinero IV"
            for k, n in self.unrouted.items()
        ]

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self):
        """A rich Table: one column per cache, one row per metric."""
        from rich.table import Table

        t = Table(title=f"{self.references:,} references", show_lines=False)
        t.add_column("metric")
        for c in self.caches:
            cfg = c.config
            t.add_column(
                f"{c.name}\n{_human(cfg.size)} {cfg.assoc}-way {cfg.block_size}B {cfg.repl}\n"
                f"walloc {cfg.walloc} wback {cfg.wback} ralloc {cfg.ralloc}",
                justify="right",
            )

        def row(label, fn):
            t.add_row(label, *[fn(c) for c in self.caches])

        row("fetches", lambda c: f"{c.total_fetches:,}")
        for a in ACCESS:
            row(f"  {a}", lambda c, a=a: f"{c.fetches[a]:,}")
        row("misses", lambda c: f"{c.total_misses:,}")
        for a in ACCESS:
            row(f"  {a}", lambda c, a=a: f"{c.misses[a]:,}")
        row("miss rate", lambda c: f"{c.miss_rate:.4f}")
        for a in ACCESS:
            row(f"  {a}", lambda c, a=a: f"{c.miss_rates()[a]:.4f}")
        if any(c.compulsory is not None for c in self.caches):
            for label, attr in (("compulsory", "compulsory"), ("capacity", "capacity"), ("conflict", "conflict")):
                row(
                    label,
                    lambda c, attr=attr: "-" if getattr(c, attr) is None else f"{sum(getattr(c, attr).values()):,}",
                )
        row("multi-block refs", lambda c: f"{c.multiblock:,}")
        row("bytes from next level", lambda c: f"{c.bytes_read:,}")
        row("bytes to next level", lambda c: f"{c.bytes_written:,}")
        row("dirty evictions", lambda c: f"{c.writebacks:,}")
        row("end copy-back blocks", lambda c: f"{c.copyback_blocks:,}")
        return t


def _human(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n}B"
