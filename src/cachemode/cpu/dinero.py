"""Dinero IV compatibility: its command-line options and its report layout.

:func:`parse_args` accepts Dinero IV's options (``-lN-Tsize``, ``-lN-Tbsize``, ``-lN-Tassoc``, ``-lN-Trepl``,
``-lN-Twalloc``, ``-lN-Twback``, ``-lN-Tccc``, ``-informat``, ``-skipcount``, ``-maxcount``,
``-flushcount``, ``-stat-interval``, ``-on-trigger``/``-off-trigger``, ``-stat-idcombine``...) and gives a
one-line error for anything malformed or not supported (prefetching, sub-blocks, ``-custom``, pixie input).
:func:`run` prints the same sections, row names and numbers as Dinero IV's ``dostats``, so
scripts that parse Dinero output keep working. This is an independent implementation written from the
documented behaviour and output format; no Dinero IV code is included.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

import numpy as np

from cachemode.cpu.config import CacheConfig, ConfigError, Hierarchy, Level
from cachemode.cpu.stats import CacheStats
from cachemode.cpu.trace import Trace
from cachemode.errors import CachemodeError

MAX_LEV = 5
IDU = "uid"
LEVEL_OPTS = ("size", "bsize", "sbsize", "assoc", "repl", "fetch", "pfdist", "pfabort", "walloc", "wback", "ccc")
GLOBAL_1ARG = (
    "-skipcount",
    "-flushcount",
    "-maxcount",
    "-stat-interval",
    "-informat",
    "-on-trigger",
    "-off-trigger",
    "-custom",
)
GLOBAL_0ARG = ("-help", "-copyright", "-contact", "-dineroIII", "-stat-idcombine")
INFORMATS = {"d": "din", "D": "xdin", "b": "bin"}


class DineroError(CachemodeError):
    """A Dinero IV option that is malformed, inconsistent or not supported."""


@dataclass
class DineroArgs:
    """Parsed Dinero IV options. ``levels[opt][idu][lev]`` mirrors Dinero's per-level option tables."""

    levels: dict[str, list[list]] = field(
        default_factory=lambda: {o: [[0] * MAX_LEV for _ in range(3)] for o in LEVEL_OPTS}
    )
    maxlevel: int = 0
    skipcount: int = 0
    flushcount: int = 0
    maxcount: int = 0
    stat_interval: int = 0
    informat: str = "D"
    on_trigger: int = 0
    off_trigger: int = 0
    stat_idcombine: bool = False
    help: bool = False

    def hierarchy(self) -> Hierarchy:
        lv = self.levels
        out = []
        for lev in range(self.maxlevel):
            caches: dict[str, CacheConfig] = {}
            for idu in range(3):
                if lv["size"][idu][lev] == 0:
                    continue
                name = f"level {lev + 1} {IDU[idu]}cache"
                try:
                    cfg = CacheConfig(
                        lv["size"][idu][lev],
                        lv["bsize"][idu][lev],
                        lv["assoc"][idu][lev],
                        repl=lv["repl"][idu][lev],
                        walloc=lv["walloc"][idu][lev] or "a",
                        wback=lv["wback"][idu][lev] or "a",
                        ccc=bool(lv["ccc"][idu][lev]),
                    )
                except ConfigError as exc:
                    raise DineroError(f"{name}: {exc}") from None
                caches[IDU[idu]] = cfg
            out.append(Level(unified=caches.get("u"), icache=caches.get("i"), dcache=caches.get("d")))
        try:
            return Hierarchy(out)
        except ConfigError as exc:
            raise DineroError(str(exc)) from None


def _scaled(opt: str, arg: str, pow2: bool = False) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", arg)
    if not m:
        raise DineroError(f'"{opt}" option requires an unsigned integer with optional k/m/g suffix, not "{arg}"')
    val = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if pow2 and (val <= 0 or val & (val - 1)):
        raise DineroError(f'"{opt}" option argument "{arg}" must be a power of 2')
    return val


def _uint(opt: str, arg: str) -> int:
    if not re.fullmatch(r"\d+", arg):
        raise DineroError(f'"{opt}" option requires an unsigned integer, not "{arg}"')
    return int(arg)


def _char(opt: str, arg: str) -> str:
    if len(arg) != 1:
        raise DineroError(f'"{opt}" option requires a single character, not "{arg}"')
    return arg


def _addr(opt: str, arg: str) -> int:
    try:
        return int(arg, 16)
    except ValueError:
        raise DineroError(f'"{opt}" option requires a hexadecimal address, not "{arg}"') from None


_LEVEL_RE = re.compile(r"-l(\d+)-([uid])(\w+)$")


def parse_args(argv: list[str]) -> DineroArgs:
    """Parse Dinero IV's command line (everything after the program name)."""
    a = DineroArgs()
    i = 0
    while i < len(argv):
        opt = argv[i]
        m = _LEVEL_RE.match(opt)
        if m and m.group(3) in LEVEL_OPTS:
            lev = int(m.group(1))
            if not 1 <= lev <= MAX_LEV:
                raise DineroError(f'"{opt}" option not recognized (levels are 1-{MAX_LEV})')
            idu = IDU.index(m.group(2))
            name = m.group(3)
            a.maxlevel = max(a.maxlevel, lev)
            if name == "ccc":
                a.levels["ccc"][idu][lev - 1] = 1
                i += 1
                continue
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise DineroError(f'"{opt}" option requires additional argument')
            arg = argv[i + 1]
            i += 2
            if name in ("size", "bsize", "sbsize"):
                a.levels[name][idu][lev - 1] = _scaled(opt, arg, pow2=True)
            elif name in ("assoc", "pfdist", "pfabort"):
                a.levels[name][idu][lev - 1] = _uint(opt, arg)
            else:
                a.levels[name][idu][lev - 1] = _char(opt, arg)
            continue
        if opt in GLOBAL_0ARG:
            i += 1
            if opt == "-stat-idcombine":
                a.stat_idcombine = True
            elif opt == "-help":
                a.help = True
            else:
                raise DineroError(f'"{opt}" is not supported by cachemode dinero (see Dinero IV\'s own docs)')
            continue
        if opt in GLOBAL_1ARG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise DineroError(f'"{opt}" option requires additional argument')
            arg = argv[i + 1]
            i += 2
            if opt == "-custom":
                raise DineroError('"-custom" is not supported: cachemode compiles its kernels itself')
            if opt == "-informat":
                a.informat = _char(opt, arg)
            elif opt in ("-on-trigger", "-off-trigger"):
                setattr(a, opt[1:].replace("-", "_"), _addr(opt, arg))
            else:
                setattr(a, opt[1:].replace("-", "_"), _scaled(opt, arg))
            continue
        if re.match(r"-[uidbSarfpPwAQzZ]", opt):
            raise DineroError(f'"{opt}" option not recognized for Dinero IV (Dinero III options are not accepted)')
        raise DineroError(f'"{opt}" option not recognized')
    if a.help:
        return a
    _verify(a)
    return a


def _verify(a: DineroArgs) -> None:
    lv = a.levels
    for lev in range(a.maxlevel):
        for idu in range(3):
            if lv["bsize"][idu][lev] and not lv["sbsize"][idu][lev]:
                lv["sbsize"][idu][lev] = lv["bsize"][idu][lev]
            if lv["size"][idu][lev]:
                if not lv["assoc"][idu][lev]:
                    lv["assoc"][idu][lev] = 1
                if not lv["repl"][idu][lev]:
                    lv["repl"][idu][lev] = "l"
                if not lv["fetch"][idu][lev]:
                    lv["fetch"][idu][lev] = "d"
                if lv["fetch"][idu][lev] != "d" and not lv["pfdist"][idu][lev]:
                    lv["pfdist"][idu][lev] = 1
                if idu != 1:
                    lv["walloc"][idu][lev] = lv["walloc"][idu][lev] or "a"
                    lv["wback"][idu][lev] = lv["wback"][idu][lev] or "a"
    if a.maxlevel <= 0:
        raise DineroError(
            "cache size and block size must be specified, e.g.: -l1-isize 16k -l1-dsize 8192 "
            "-l1-ibsize 32 -l1-dbsize 16"
        )
    for lev in range(a.maxlevel):
        nidu = 0
        for idu in range(3):
            keys = ("bsize", "sbsize", "size", "assoc", "repl", "fetch", "walloc", "wback")
            nparams = sum(1 for k in keys if lv[k][idu][lev])
            active = nparams != 0 or lv["ccc"][idu][lev]
            nidu += bool(active)
            if active and nparams != 6 + 2 * (idu != 1):
                c = IDU[idu]
                if idu == 1 and (lv["walloc"][idu][lev] or lv["wback"][idu][lev]):
                    what = "walloc" if lv["walloc"][idu][lev] else "wback"
                    raise DineroError(
                        f"level {lev + 1} icache cannot have write {'allocate' if what == 'walloc' else 'back'} policy"
                    )
                if not lv["bsize"][idu][lev]:
                    raise DineroError(
                        f"level {lev + 1} {c}cache block size must be specified, e.g., -l{lev + 1}-{c}bsize 16"
                    )
                raise DineroError(f"level {lev + 1} {c}cache size must be specified, e.g., -l{lev + 1}-{c}size 16k")
        if nidu == 0:
            raise DineroError(f"no level {lev + 1} cache specified")
    if a.informat not in INFORMATS:
        if a.informat in "pP":
            raise DineroError(f"-informat {a.informat} (pixie traces) is not supported; use d, D or b")
        raise DineroError(f"unknown input format '{a.informat}'")
    for lev in range(a.maxlevel):
        for idu in range(3):
            c = f"level {lev + 1} {IDU[idu]}cache"
            if lv["repl"][idu][lev] and lv["repl"][idu][lev] not in "lfr":
                raise DineroError(f"{c} replacement policy unrecognized")
            f = lv["fetch"][idu][lev]
            if f and f not in "damtls":
                raise DineroError(f"{c} fetch policy unrecognized")
            if f and f != "d":
                raise DineroError(f"{c}: prefetch policy '{f}' is not supported (only demand fetch, d)")
            if lv["pfabort"][idu][lev]:
                raise DineroError(f"{c} abort % not allowed with demand fetch policy")
            for opt, what in (("walloc", "write allocate"), ("wback", "write back")):
                if lv[opt][idu][lev] and lv[opt][idu][lev] not in "anf":
                    raise DineroError(f"{c} {what} policy unrecognized")
            if lv["bsize"][idu][lev] and lv["sbsize"][idu][lev] > lv["bsize"][idu][lev]:
                raise DineroError(f"{c} has sub-blocksize > blocksize")
            if lv["sbsize"][idu][lev] and lv["sbsize"][idu][lev] != lv["bsize"][idu][lev]:
                raise DineroError(f"{c}: sub-blocks are not supported (sbsize must equal bsize)")
        has_u = any(lv[k][0][lev] for k in LEVEL_OPTS)
        has_id = any(lv[k][idu][lev] for k in LEVEL_OPTS for idu in (1, 2))
        if has_u and has_id:
            raise DineroError(f"level {lev + 1} has i or d together with u cache parameters")
    if a.stat_idcombine:
        for lev in range(a.maxlevel):
            if lv["bsize"][1][lev] != lv["bsize"][2][lev]:
                raise DineroError(f"level {lev + 1} i & d cache block sizes must match for -stat-idcombine")
    a.hierarchy()  # size/assoc consistency


class InputWindow:
    """-skipcount, -on-trigger/-off-trigger and -maxcount, applied chunk by chunk as Dinero's ``next_trace_item``
    does: skip the first records, then drop records outside the trigger window (the triggers themselves too),
    then stop after ``maxcount`` records; ``exceeded`` once a record beyond them was read."""

    def __init__(self, a: DineroArgs):
        self.skip = a.skipcount
        self.on, self.off = a.on_trigger, a.off_trigger
        self.discard = a.on_trigger != 0
        self.toggled = False
        self.maxcount = a.maxcount
        self.taken = 0
        self.exceeded = False

    def apply(self, trace: Trace) -> Trace:
        if self.skip:
            k = min(self.skip, len(trace))
            self.skip -= k
            trace = trace.slice(k)
        if self.on or self.off:
            trace = self._triggers(trace)
        if self.maxcount and self.taken + len(trace) > self.maxcount:
            trace = trace.slice(0, self.maxcount - self.taken)
            self.exceeded = True
        self.taken += len(trace)
        return trace

    def _triggers(self, trace: Trace) -> Trace:
        addrs = trace.addrs
        on, off = np.uint64(self.on), np.uint64(self.off)
        cand = np.flatnonzero((addrs != 0) & ((addrs == on) | (addrs == off)))
        keep = np.zeros(len(trace), bool)
        start = 0
        for p in cand.tolist():
            ad = int(addrs[p])
            if (self.discard and ad == self.on) or (not self.discard and ad == self.off):
                if not self.discard:
                    keep[start:p] = True
                self.discard = not self.discard
                self.toggled = True
                start = p + 1
        if not self.discard:
            keep[start:] = True
        idx = np.flatnonzero(keep)
        return Trace(trace.types[idx], trace.addrs[idx], trace.sizes[idx])

    def warnings(self) -> list[str]:
        """Dinero's warnings at the end of the input (none when -maxcount stopped the run first)."""
        if self.skip:
            return ["input ended before -skipcount satisfied"]
        if self.exceeded:
            return []
        if (self.on or self.off) and not self.toggled:
            return ["trace discard trigger addresses were not matched"]
        if not self.discard and self.off:
            return ["tail end of trace not discarded"]
        return []


HEADER = (
    "---cachemode dinero: a Dinero IV (version 7) compatible cache simulator\n"
    "---Dinero IV is by Jan Edler and Mark D. Hill; this is cachemode's own implementation of its\n"
    "---command line, accounting and report layout, so that scripts written for Dinero IV keep working.\n"
)


def format_summary(a: DineroArgs) -> str:
    """The "Summary of options" block, in Dinero's order (per option: u caches, then i, then d)."""
    lines = ["", "---Summary of options (-help option gives usage information).", ""]
    lv = a.levels
    for opt in LEVEL_OPTS:
        for idu in range(3):
            for lev in range(a.maxlevel):
                v = lv[opt][idu][lev]
                if not v:
                    continue
                name = f"-l{lev + 1}-{IDU[idu]}{opt}"
                lines.append(name if opt == "ccc" else f"{name} {v}")
    lines += [
        f"-skipcount {a.skipcount}",
        f"-flushcount {a.flushcount}",
        f"-maxcount {a.maxcount}",
        f"-stat-interval {a.stat_interval}",
        f"-informat {a.informat}",
        f"-on-trigger 0x{a.on_trigger:x}",
        f"-off-trigger 0x{a.off_trigger:x}",
    ]
    if a.stat_idcombine:
        lines.append("-stat-idcombine")
    return "\n".join(lines) + "\n"


def _nz(x: float) -> float:
    return 1.0 if x == 0 else float(x)


def _row(label: str, vals, fmt: str) -> str:
    return f" {label}" + "".join(f"\t{v:12{fmt}}" for v in vals) + "\n"


@dataclass
class _Counts:
    name: str
    fetch: list[float]
    miss: list[float]
    comp: list[float] | None
    cap: list[float] | None
    conf: list[float] | None
    multiblock: float
    bytes_read: float
    bytes_written: float


def _counts(c: CacheStats) -> _Counts:
    order = ("read", "write", "ifetch", "misc")

    def f(d):
        return None if d is None else [float(d[k]) for k in order]

    return _Counts(
        c.name,
        f(c.fetches),
        f(c.misses),
        f(c.compulsory),
        f(c.capacity),
        f(c.conflict),
        float(c.multiblock),
        float(c.bytes_read),
        float(c.bytes_written),
    )


def _combine(name: str, i: _Counts, d: _Counts) -> _Counts:
    def add(x, y):
        if x is None and y is None:
            return None
        x = x or [0.0] * 4
        y = y or [0.0] * 4
        return [p + q for p, q in zip(x, y, strict=True)]

    return _Counts(
        name,
        add(i.fetch, d.fetch),
        add(i.miss, d.miss),
        add(i.comp, d.comp),
        add(i.cap, d.cap),
        add(i.conf, d.conf),
        i.multiblock + d.multiblock,
        i.bytes_read + d.bytes_read,
        i.bytes_written + d.bytes_written,
    )


def format_cache(c: _Counts) -> str:
    """One cache's table, as Dinero's ``do1stats`` lays it out (demand fetch, no sub-blocks)."""
    R, W, I, M = 0, 1, 2, 3  # noqa: E741
    fe, mi = c.fetch, c.miss
    out = [
        f"{c.name}\n",
        " Metrics\t\t      Total\t      Instrn\t       Data\t       Read\t      Write\t       Misc\n",
        " -----------------\t      ------\t      ------\t      ------\t      ------\t      ------\t      ------\n",
    ]
    fd = fe[M] + fe[R] + fe[W]
    fa = fd + fe[I]
    out.append(_row("Demand Fetches\t", (fa, fe[I], fd, fe[R], fe[W], fe[M]), ".0f"))
    t = _nz(fa)
    out.append(_row(" Fraction of total", (fa / t, fe[I] / t, fd / t, fe[R] / t, fe[W] / t, fe[M] / t), ".4f"))
    out.append("\n")
    md = mi[M] + mi[R] + mi[W]
    ma = md + mi[I]
    out.append(_row("Demand Misses\t", (ma, mi[I], md, mi[R], mi[W], mi[M]), ".0f"))
    out.append(
        _row(
            " Demand miss rate",
            (
                ma / _nz(fa),
                mi[I] / _nz(fe[I]),
                md / _nz(fd),
                mi[R] / _nz(fe[R]),
                mi[W] / _nz(fe[W]),
                mi[M] / _nz(fe[M]),
            ),
            ".4f",
        )
    )
    if c.comp is not None:
        sums = []
        for label, arr in (
            ("  Compulsory misses", c.comp),
            ("  Capacity misses", c.cap),
            ("  Conflict misses", c.conf),
        ):
            d = arr[M] + arr[R] + arr[W]
            sums.append((d + arr[I], d, arr))
            out.append(_row(label, (d + arr[I], arr[I], d, arr[R], arr[W], arr[M]), ".0f"))
        for label, (tot, d, arr) in zip(
            ("  Compulsory fraction", "  Capacity fraction", "  Conflict fraction"), sums, strict=True
        ):
            out.append(
                _row(
                    label,
                    (
                        tot / _nz(ma),
                        arr[I] / _nz(mi[I]),
                        d / _nz(md),
                        arr[R] / _nz(mi[R]),
                        arr[W] / _nz(mi[W]),
                        arr[M] / _nz(mi[M]),
                    ),
                    ".4f",
                )
            )
    out.append("\n")
    out.append(f" Multi-block refs      {c.multiblock:12.0f}\n")
    out.append(f" Bytes From Memory\t{c.bytes_read:12.0f}\n")
    out.append(f" ( / Demand Fetches)\t{c.bytes_read / _nz(fa):12.4f}\n")
    out.append(f" Bytes To Memory\t{c.bytes_written:12.0f}\n")
    out.append(f" ( / Demand Writes)\t{c.bytes_written / _nz(fe[W]):12.4f}\n")
    tot = c.bytes_read + c.bytes_written
    out.append(f" Total Bytes r/w Mem\t{tot:12.0f}\n")
    out.append(f" ( / Demand Fetches)\t{tot / _nz(fa):12.4f}\n")
    out.append("\n")
    return "".join(out)


def format_stats(a: DineroArgs, caches: list[CacheStats]) -> str:
    """All caches, level by level (u, i, d), combining i and d with ``-stat-idcombine``."""
    by = {c.name: _counts(c) for c in caches}
    out = []
    for lev in range(1, a.maxlevel + 1):
        u, i, d = (by.get(f"l{lev}-{k}cache") for k in "uid")
        if a.stat_idcombine and u is None:
            zero = _Counts("", [0.0] * 4, [0.0] * 4, None, None, None, 0.0, 0.0, 0.0)
            out.append(format_cache(_combine(f"l{lev}-I/Dcaches", i or zero, d or zero)))
            continue
        out += [format_cache(x) for x in (u, i, d) if x is not None]
    return "".join(out)


USAGE = """\
Usage: cachemode dinero [options] < trace
Dinero IV compatible options (demand fetch, no sub-blocks):
 -lN-Tsize P        cache size (N = level 1-5, T = u, i or d; P = power of 2, k/m/g suffix)
 -lN-Tbsize P       block size
 -lN-Tassoc U       associativity (default 1)
 -lN-Trepl C        replacement: l LRU, f FIFO, r random (default l)
 -lN-Tfetch d       demand fetch (the only fetch policy supported)
 -lN-Twalloc C      write allocate: a always, n never, f nofetch (default a)
 -lN-Twback C       write back: a always, n never (write-through), f nofetch (default a)
 -lN-Tccc           compulsory/capacity/conflict miss statistics
 -informat C        d din, D extended din (default), b binary
 -skipcount U       skip initial U references
 -flushcount U      flush caches every U references
 -maxcount U        stop after U references
 -on-trigger A      start simulating at hex address A
 -off-trigger A     stop simulating at hex address A
 -stat-interval U    print statistics every U references too
 -stat-idcombine    combine i and d statistics
"""


def run(argv: list[str], source: BinaryIO | str, out: TextIO) -> list[str]:
    """Run ``cachemode dinero`` on a trace read in chunks from ``source`` (a binary file, or a name; ``-`` is stdin),
    writing the report to ``out`` as Dinero does (the statistics of ``-stat-interval`` as the run goes).
    Returns the warnings for stderr."""
    from cachemode.cpu.simulate import Simulation
    from cachemode.cpu.trace import TraceReader, read_ahead

    a = parse_args(argv)
    if a.help:
        out.write(USAGE)
        return []
    sim = Simulation(a.hierarchy(), flushcount=a.flushcount, reader_thread=True)
    window = InputWindow(a)
    out.write(HEADER + format_summary(a) + "\n---Simulation begins.\n")
    every = a.stat_interval
    with TraceReader(source, INFORMATS[a.informat], name="<stdin>") as reader:
        for chunk in read_ahead(reader):
            chunk = window.apply(chunk)
            while every and len(chunk) >= every - sim.references % every:
                # statistics after every N records, before a flush due at the same record
                cut = every - sim.references % every
                sim.feed(chunk.slice(0, cut))
                out.write(format_stats(a, sim.stats().caches))
                chunk = chunk.slice(cut)
            sim.feed(chunk)
            if window.exceeded:
                break
    result = sim.finish()
    out.write(
        ("---Maximum address count exceeded.\n" if window.exceeded else "")
        + "---Simulation complete.\n"
        + format_stats(a, result.caches)
        + "---Execution complete.\n"
    )
    return window.warnings()


def main_text(argv: list[str], data: bytes) -> tuple[str, list[str]]:
    """Run ``cachemode dinero`` on trace bytes held in memory; returns (stdout text, warnings)."""
    out = io.StringIO()
    warnings = run(argv, io.BytesIO(data), out)
    return out.getvalue(), warnings


def run_cli(argv: list[str]) -> None:
    """``cachemode dinero ARGS``: Dinero's own options (``--help`` and ``-h`` as its ``-help``), stdin to stdout."""
    warnings = run(["-help" if arg in ("--help", "-h") else arg for arg in argv], "-", sys.stdout)
    for w in warnings:
        print(f"cachemode dinero: warning: {w}", file=sys.stderr)
