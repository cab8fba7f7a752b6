"""Cache and hierarchy descriptions: dataclasses, validation with clear errors, parsing of specs and TOML.

A :class:`Hierarchy` is a list of up to five :class:`Level` objects, nearest the CPU first. Each level is
either one unified cache or a split pair of instruction and data caches. Split levels must all sit above the
unified ones (the instruction and data sides merge once, at the first unified level).

Policies use Dinero IV's letters where Dinero has the concept:

- ``repl``: ``lru`` (``l``), ``fifo`` (``f``), ``random`` (``r``, seeded), ``plru`` (tree pseudo-LRU).
- ``walloc``: ``a`` always, ``n`` never (no-write-allocate), ``f`` nofetch (allocate only whole-block writes).
- ``wback``: ``a`` always (write-back), ``n`` never (write-through), ``f`` nofetch.
- ``ralloc``: ``a`` allocate on read misses (Dinero), ``n`` read-through: forward the read, install nothing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from cachemode.errors import CachemodeError

MAX_LEVELS = 5
REPL = {"lru": 0, "l": 0, "fifo": 1, "f": 1, "random": 2, "r": 2, "plru": 3, "p": 3}
REPL_NAMES = ("lru", "fifo", "random", "plru")
WALLOC = {"a": 0, "always": 0, "allocate": 0, "n": 1, "never": 1, "no-allocate": 1, "f": 2, "nofetch": 2}
WBACK = {
    "a": 0,
    "always": 0,
    "back": 0,
    "write-back": 0,
    "n": 1,
    "never": 1,
    "through": 1,
    "write-through": 1,
    "f": 2,
    "nofetch": 2,
}
RALLOC = {"a": 1, "allocate": 1, "always": 1, "n": 0, "never": 0, "through": 0, "read-through": 0}


class ConfigError(CachemodeError):
    """A cache or hierarchy description that cannot be simulated."""


def parse_size(value: str | int, what: str = "size") -> int:
    """``8k``, ``1M``, ``64`` or an int -> bytes (k/m/g are powers of 1024, as in Dinero)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a number")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", str(value))
    if not m:
        raise ConfigError(f"{what} {value!r} is not a number with an optional k/m/g suffix")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * scale


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _policy(table: dict[str, int], value, what: str, letters: str) -> str:
    key = str(value).lower()
    if key not in table:
        raise ConfigError(f"{what} {value!r} is not one of {letters}")
    return key


@dataclass
class CacheConfig:
    """One cache. ``assoc=0`` (or ``"full"``) means fully associative."""

    size: int
    block_size: int
    assoc: int = 1
    repl: str = "lru"
    walloc: str = "a"
    wback: str = "a"
    ralloc: str = "a"
    ccc: bool = False
    seed: int = 1

    def __post_init__(self) -> None:
        self.size = parse_size(self.size, "cache size")
        self.block_size = parse_size(self.block_size, "block size")
        if isinstance(self.assoc, str):
            self.assoc = 0 if self.assoc.lower() in ("full", "f", "fa", "0") else parse_size(self.assoc, "assoc")
        self.repl = REPL_NAMES[REPL[_policy(REPL, self.repl, "replacement policy", "lru, fifo, random, plru")]]
        self.walloc = "anf"[WALLOC[_policy(WALLOC, self.walloc, "write-allocate policy", "a, n, f")]]
        self.wback = "anf"[WBACK[_policy(WBACK, self.wback, "write-back policy", "a, n, f")]]
        self.ralloc = "na"[RALLOC[_policy(RALLOC, self.ralloc, "read-allocate policy", "a, n")]]
        self.validate()

    def validate(self) -> None:
        if not _pow2(self.size):
            raise ConfigError(f"cache size {self.size} is not a power of 2")
        if not _pow2(self.block_size):
            raise ConfigError(f"block size {self.block_size} is not a power of 2")
        if self.block_size > self.size:
            raise ConfigError(f"block size {self.block_size} is larger than the cache ({self.size})")
        if self.assoc == 0:
            self.assoc = self.size // self.block_size
        if self.assoc < 1:
            raise ConfigError(f"associativity {self.assoc} must be at least 1")
        nblocks = self.size // self.block_size
        if self.assoc > nblocks:
            raise ConfigError(
                f"associativity {self.assoc} exceeds the {nblocks} blocks of a {self.size}-byte cache "
                f"with {self.block_size}-byte blocks"
            )
        if self.repl == "plru" and not _pow2(self.assoc):
            raise ConfigError(f"tree pseudo-LRU needs a power-of-2 associativity, not {self.assoc}")

    @property
    def nsets(self) -> int:
        """size / (block size x assoc), rounded down as in Dinero IV: with an associativity that does not divide the
        number of blocks (``assoc=3``) the cache holds ``nsets * assoc`` blocks, a few less than ``size`` says."""
        return self.size // self.block_size // self.assoc

    @property
    def nblocks(self) -> int:
        """The blocks the cache holds."""
        return self.nsets * self.assoc

    def params(self) -> tuple[int, ...]:
        """The integers a kernel takes: lg2 block, sets, ways, repl, walloc, wback, ralloc, ccc, seed."""
        return (
            self.block_size.bit_length() - 1,
            self.nsets,
            self.assoc,
            REPL[self.repl],
            WALLOC[self.walloc],
            WBACK[self.wback],
            RALLOC[self.ralloc],
            int(bool(self.ccc)),
            int(self.seed),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Level:
    """One level: either ``unified`` or the split pair ``icache``/``dcache`` (either may be absent)."""

    unified: CacheConfig | None = None
    icache: CacheConfig | None = None
    dcache: CacheConfig | None = None

    def __post_init__(self) -> None:
        if self.unified is not None and (self.icache is not None or self.dcache is not None):
            raise ConfigError("a level is either unified or split into instruction and data caches, not both")
        if self.unified is None and self.icache is None and self.dcache is None:
            raise ConfigError("a level needs a unified cache or an instruction/data cache")

    @property
    def split(self) -> bool:
        return self.unified is None


@dataclass
class Hierarchy:
    """Levels nearest the CPU first."""

    levels: list[Level] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.levels:
            raise ConfigError("the hierarchy has no cache levels")
        if len(self.levels) > MAX_LEVELS:
            raise ConfigError(f"at most {MAX_LEVELS} cache levels, not {len(self.levels)}")
        seen_unified = False
        for n, lev in enumerate(self.levels, 1):
            if lev.split and seen_unified:
                raise ConfigError(f"level {n} is split but a level above it is unified; split levels must come first")
            seen_unified = seen_unified or not lev.split

    @classmethod
    def single(cls, cache: CacheConfig) -> Hierarchy:
        return cls([Level(unified=cache)])

    def caches(self) -> list[tuple[str, CacheConfig]]:
        """(name, config) in Dinero's print order: per level u, i, d; names like ``l1-ucache``."""
        out = []
        for n, lev in enumerate(self.levels, 1):
            for kind, cfg in (("u", lev.unified), ("i", lev.icache), ("d", lev.dcache)):
                if cfg is not None:
                    out.append((f"l{n}-{kind}cache", cfg))
        return out

    def to_dict(self) -> dict:
        return {name: cfg.to_dict() for name, cfg in self.caches()}


_SPEC_KEYS = {"repl", "walloc", "wback", "ralloc", "ccc", "seed"}


def parse_level_spec(spec: str) -> tuple[int | None, str, CacheConfig]:
    """Parse ``[lN-]T:SIZE:BSIZE:ASSOC[:key=value]...`` (T = u, i or d; ASSOC a number or ``full``).

    Keys: ``repl`` (lru|fifo|random|plru), ``walloc`` (a|n|f), ``wback`` (a|n|f), ``ralloc`` (a|n),
    ``seed``; a bare ``ccc`` turns on 3C classification. Example: ``l1-d:32k:64:8:wback=n:ccc``.
    """
    parts = spec.split(":")
    m = re.fullmatch(r"(?:[lL](\d)-)?([uidUID])", parts[0].strip())
    if not m or len(parts) < 4:
        raise ConfigError(
            f"level spec {spec!r} is not [lN-]T:SIZE:BSIZE:ASSOC[:key=value...] (T = u, i or d), "
            "e.g. u:32k:64:8 or l2-u:1m:64:16:repl=fifo"
        )
    level = int(m.group(1)) if m.group(1) else None
    kind = m.group(2).lower()
    kw: dict = {}
    for opt in parts[4:]:
        if opt.strip().lower() == "ccc":
            kw["ccc"] = True
            continue
        key, sep, val = opt.partition("=")
        key = key.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise ConfigError(f"level spec {spec!r}: unknown option {opt!r} (use {', '.join(sorted(_SPEC_KEYS))})")
        if key == "ccc":
            kw["ccc"] = val.strip().lower() in ("1", "true", "yes", "y")
        elif key == "seed":
            try:
                kw["seed"] = int(val)
            except ValueError:
                raise ConfigError(f"level spec {spec!r}: seed {val!r} is not an integer") from None
        else:
            kw[key] = val.strip()
    assoc = parts[3].strip()
    if not (assoc.isdigit() and int(assoc) > 0) and assoc.lower() != "full":
        raise ConfigError(f"level spec {spec!r}: associativity {assoc!r} is not a number of ways (1 or more) or 'full'")
    try:
        cfg = CacheConfig(parts[1], parts[2], assoc, **kw)
    except ConfigError as exc:
        raise ConfigError(f"level spec {spec!r}: {exc}") from None
    return level, kind, cfg


def hierarchy_from_specs(specs: list[str]) -> Hierarchy:
    """Build a hierarchy from ``--level`` specs; without ``lN-``, ``u`` and ``i`` open a new level and ``d``
    joins a preceding ``i`` on the same level."""
    table: dict[int, dict[str, CacheConfig]] = {}
    current = 0
    for spec in specs:
        level, kind, cfg = parse_level_spec(spec)
        if level is None:
            level = current if kind == "d" and current in table and set(table[current]) == {"i"} else current + 1
        if not 1 <= level <= MAX_LEVELS:
            raise ConfigError(f"level spec {spec!r}: level must be 1-{MAX_LEVELS}")
        slot = table.setdefault(level, {})
        if kind in slot:
            raise ConfigError(f"level spec {spec!r}: level {level} already has a {kind} cache")
        slot[kind] = cfg
        current = max(current, level)
    return _from_table(table)


def _from_table(table: dict[int, dict[str, CacheConfig]]) -> Hierarchy:
    if not table:
        raise ConfigError("no cache levels given")
    levels = []
    for n in range(1, max(table) + 1):
        if n not in table:
            raise ConfigError(f"no level {n} cache specified")
        slot = table[n]
        levels.append(Level(unified=slot.get("u"), icache=slot.get("i"), dcache=slot.get("d")))
    return Hierarchy(levels)


def load_toml(path: str) -> Hierarchy:
    """Load a hierarchy from TOML::

    [[level]]
    i = { size = "32k", block = 64, assoc = 8 }
    d = { size = "32k", block = 64, assoc = 8, wback = "a", walloc = "a" }
    [[level]]
    u = { size = "1m", block = 64, assoc = 16, repl = "lru" }
    """
    import tomllib  # here: only TOML configs need it, and `cachemode dinero` starts faster without

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    levels = doc.get("level")
    if not isinstance(levels, list) or not levels:
        raise ConfigError(f"{path}: expected one or more [[level]] tables")
    table: dict[int, dict[str, CacheConfig]] = {}
    allowed = {"size", "block", "block_size", "assoc", "repl", "walloc", "wback", "ralloc", "ccc", "seed"}
    for n, lev in enumerate(levels, 1):
        if not isinstance(lev, dict):
            raise ConfigError(f"{path}: level {n} is not a table")
        slot = table.setdefault(n, {})
        for key, body in lev.items():
            kind = {"u": "u", "unified": "u", "i": "i", "icache": "i", "d": "d", "dcache": "d"}.get(key)
            if kind is None or not isinstance(body, dict):
                raise ConfigError(f"{path}: level {n}: unknown key {key!r} (use u, i or d tables)")
            extra = set(body) - allowed
            if extra:
                raise ConfigError(f"{path}: level {n} {kind}: unknown option(s) {', '.join(sorted(extra))}")
            if "size" not in body or not ("block" in body or "block_size" in body):
                raise ConfigError(f"{path}: level {n} {kind}: size and block are required")
            kw = {k: v for k, v in body.items() if k not in ("size", "block", "block_size")}
            try:
                slot[kind] = CacheConfig(body["size"], body.get("block", body.get("block_size")), **kw)
            except ConfigError as exc:
                raise ConfigError(f"{path}: level {n} {kind}: {exc}") from None
            except TypeError as exc:
                raise ConfigError(f"{path}: level {n} {kind}: {exc}") from None
    return _from_table(table)
