"""Crash-state exploration over a write log, in the manner of CrashMonkey and replay-log.

For a crash after log entry ``k`` (the crash point), what the mode allows is:

* every *durable* write survives: the writes covered by a FLUSH completed before ``k`` (its ``covers``
  prefix), and every FUA write before ``k``;
* any subset of the other writes before ``k`` (acknowledged, not durable) may survive, each whole or torn at
  sector granularity, applied in log (completion) order.

The mode decides what a barrier is: in writethrough and directsync every write is durable on completion (a
barrier of its own); in unsafe neither FLUSH nor FUA is (no barrier at all); writeback and none honour both.

States generated: the prefix at every barrier (replay-log's ``--check flush|fua``: all of the log up to the
barrier, the state a crash right after it with everything landed leaves), then random states: a crash point
at the end of a random epoch, its durable part, and a random subset of its candidates, some torn
(CrashMonkey's reordering mode). States are de-duplicated by the hash of the sectors they change.

Materialising a state costs what it changes, not the image: an in-process checker gets a copy of the base in
memory with the state's sectors applied; a command checker gets a per-worker scratch image, a reflink clone of
the base when the filesystem can, otherwise one copy made once and restored sector by sector after each check.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachemode.disk.layer import Layer
from cachemode.errors import CachemodeError
from cachemode.lab.record import FLUSH, MARK, WriteLog
from cachemode.modes import CacheMode

FICLONE = 0x40049409


class ExploreError(CachemodeError):
    """Crash exploration cannot run as asked (base image, checker, options)."""


@dataclass(frozen=True)
class CrashState:
    """A crash state: the crash point, and which writes before it survive (whole, or the listed sectors)."""

    crash_point: int
    kind: str  # "prefix", "subset" or "torn"
    durable: tuple[int, ...]
    kept: tuple[int, ...]  # candidate writes kept whole
    torn: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (entry index, kept sector numbers)

    def describe(self) -> dict[str, object]:
        return {
            "crash_point": self.crash_point,
            "kind": self.kind,
            "durable_writes": len(self.durable),
            "kept": list(self.kept),
            "torn": {str(i): list(s) for i, s in self.torn},
        }


@dataclass
class Outcome:
    ok: bool
    output: str = ""
    kinds: tuple[str, ...] = ()  # violation kinds, for checkers that classify failures


@dataclass
class Report:
    mode: str
    seed: int
    sector: int
    log_entries: int
    log_writes: int
    barriers: int
    generated: int = 0
    duplicates: int = 0
    checked: int = 0
    passed: int = 0
    failed: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {"prefix": 0, "subset": 0, "torn": 0})
    violations: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0  # checking (materialising each state and running the checker)
    prepare_seconds: float = 0.0  # generating, building and de-duplicating the states
    materialise: str = "overlay"  # in-process: OverlayImage; commands: reflink or copy-once+restore

    @property
    def per_state_ms(self) -> float:
        return 1000 * self.seconds / self.checked if self.checked else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "sector": self.sector,
            "log": {"entries": self.log_entries, "writes": self.log_writes, "barriers": self.barriers},
            "states": {
                "generated": self.generated,
                "duplicates": self.duplicates,
                "checked": self.checked,
                "passed": self.passed,
                "failed": self.failed,
                "by_kind": self.by_kind,
            },
            "violations": self.violations,
            "failures": self.failures,
            "seconds": round(self.seconds, 3),
            "prepare_seconds": round(self.prepare_seconds, 3),
            "ms_per_state": round(self.per_state_ms, 3),
            "materialise": self.materialise,
        }


class CrashModel:
    """Which writes are durable and which are candidates at each crash point, under one cache mode."""

    def __init__(self, log: WriteLog, mode: CacheMode, *, write_cache: bool = True) -> None:
        self.log = log
        self.mode = mode
        entries = log.entries
        every = mode.every_write_durable(write_cache)
        honour = not mode.no_flush
        self.writes = [e.index for e in entries if e.is_write]
        # frontier[k]: entries [0, frontier[k]) are durable at a crash after k entries
        self.frontier = [0] * (len(entries) + 1)
        self.solo = [False] * len(entries)  # durable on its own completion (FUA, or every write)
        barriers = []
        f = 0
        for e in entries:
            if honour and e.kind == FLUSH:
                f = max(f, e.covers)
                barriers.append(e.index + 1)
            if e.is_write and (every or (honour and e.fua)):
                self.solo[e.index] = True
                barriers.append(e.index + 1)
            self.frontier[e.index + 1] = f
        self.barriers = sorted(set(barriers))

    def durable(self, k: int) -> list[int]:
        f = self.frontier[k]
        return [i for i in self.writes if i < k and (i < f or self.solo[i])]

    def candidates(self, k: int) -> list[int]:
        f = self.frontier[k]
        return [i for i in self.writes if f <= i < k and not self.solo[i]]

    def marks_before(self, k: int) -> list[str]:
        return [e.name for e in self.log.entries[:k] if e.kind == MARK]


def generate(model: CrashModel, states: int, rng: random.Random, sector: int) -> Iterator[CrashState]:
    """Prefix states at the barriers, then random subset / torn states, up to ``states`` in all (with dups)."""
    n = len(model.log.entries)
    points = sorted({0, *model.barriers, n})
    # epoch ends: just before each barrier completes, and the end of the log
    ends = [k for k in sorted({b - 1 for b in model.barriers if b > 1} | {n}) if model.candidates(k)]
    random_possible = bool(ends)
    budget = states // 2 if random_possible else states
    if len(points) > budget:  # keep the first and the last, spread the rest
        step = (len(points) - 1) / max(1, budget - 1)
        points = sorted({points[round(i * step)] for i in range(budget)})
    produced = 0
    for k in points:
        if produced >= states:
            return
        produced += 1
        yield CrashState(k, "prefix", tuple(model.durable(k)), tuple(model.candidates(k)))
    if not random_possible:
        return
    entries = model.log.entries
    while produced < states:
        k = rng.choice(ends)
        cands = model.candidates(k)
        q = rng.random()
        kept, torn = [], []
        for i in cands:
            if rng.random() >= q:
                continue
            e = entries[i]
            secs = list(range(e.offset // sector, (e.offset + e.length + sector - 1) // sector))
            if len(secs) > 1 and rng.random() < 0.25:
                part = tuple(s for s in secs if rng.random() < 0.5)
                if part and len(part) < len(secs):
                    torn.append((i, part))
                    continue
                if not part:
                    continue
            kept.append(i)
        produced += 1
        yield CrashState(k, "torn" if torn else "subset", tuple(model.durable(k)), tuple(kept), tuple(torn))


class Overlay:
    """The sectors a crash state changes, over the base image: sector number -> its new content."""

    def __init__(self, sector: int) -> None:
        self.sector = sector
        self.sectors: dict[int, bytes] = {}

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in sorted(self.sectors):
            h.update(s.to_bytes(8, "little"))
            h.update(self.sectors[s])
        return h.hexdigest()


def build_overlay(state: CrashState, log: WriteLog, base_read: Callable[[int, int], bytes], sector: int) -> Overlay:
    """Apply the state's writes in log order, computed backwards: the last write to a whole sector decides it.

    Walking the log from the end, a write covering a whole sector settles it and every earlier write to that
    sector is skipped; partial-sector pieces wait for what lies under them (an earlier whole write, or the base).
    """
    ov = Overlay(sector)
    final = ov.sectors
    pending: dict[int, list[tuple[int, int, bytes | None, int]]] = {}  # later pieces first
    torn = dict(state.torn)
    size = log.size
    for i in sorted({*state.durable, *state.kept, *torn}, reverse=True):
        e = log.entries[i]
        data = e.data if e.kind == 1 else None
        only = set(torn[i]) if i in torn else None
        offset, end = e.offset, e.offset + e.length
        for s in range(offset // sector, (end + sector - 1) // sector):
            if s in final or (only is not None and s not in only):
                continue
            start = s * sector
            slen = min(sector, size - start)
            lo, hi = max(start, offset), min(start + slen, end)
            if lo == start and hi == start + slen:
                content = bytes(hi - lo) if data is None else data[lo - offset : hi - offset]
                patches = pending.pop(s, None)
                if patches:
                    content = _patch(content, patches, start)
                final[s] = content
            else:
                pending.setdefault(s, []).append((lo, hi, data, offset))
    for s, patches in pending.items():
        start = s * sector
        final[s] = _patch(base_read(min(sector, size - start), start), patches, start)
    return ov


def _patch(content: bytes, patches: list[tuple[int, int, bytes | None, int]], start: int) -> bytes:
    buf = bytearray(content)
    for lo, hi, data, offset in reversed(patches):  # earliest first
        buf[lo - start : hi - start] = bytes(hi - lo) if data is None else data[lo - offset : hi - offset]
    return bytes(buf)


# -- checkers -------------------------------------------------------------------------------------------------
class OverlayImage(Layer):
    """A crash state's image for an in-process checker: the shared base plus the state's sectors.

    Nothing is copied per state but the sectors the state changes; what the checker writes (SQLite rolling back
    a hot journal) is copy-on-write too, so the base is never touched. ``image[a:b]`` reads a range.
    """

    def __init__(self, base: bytes, sectors: dict[int, bytes], sector: int) -> None:
        super().__init__(None)
        self.base = base
        self.sector = sector
        self.sectors = dict(sectors)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.base)

    @property
    def read_only(self) -> bool:
        return False

    @property
    def alignment(self) -> int:
        return 1

    def _touched(self, offset: int, length: int) -> list[int]:
        first, last = offset // self.sector, (offset + length - 1) // self.sector
        if last - first + 1 <= len(self.sectors):
            return [s for s in range(first, last + 1) if s in self.sectors]
        return sorted(s for s in self.sectors if first <= s <= last)

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            touched = self._touched(offset, length) if length > 0 else []
            if not touched:
                return bytes(self.base[offset : offset + length])
            out = bytearray(self.base[offset : offset + length])
            end = offset + len(out)
            for s in touched:
                start = s * self.sector
                lo, hi = max(start, offset), min(start + self.sector, end)
                out[lo - offset : hi - offset] = self.sectors[s][lo - start : hi - start]
            return bytes(out)

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        return self.pread(max(0, stop - start), start)

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        with self._lock:
            for s in range(offset // self.sector, (end + self.sector - 1) // self.sector):
                start = s * self.sector
                cur = self.sectors.get(s)
                buf = bytearray(cur if cur is not None else self.base[start : start + self.sector])
                lo, hi = max(start, offset), min(start + len(buf), end)
                buf[lo - start : hi - start] = view[lo - offset : hi - offset]
                self.sectors[s] = bytes(buf)

    def zero(self, offset: int, length: int, **kwargs: object) -> None:
        self.pwrite(bytes(length), offset)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


InProcessChecker = Callable[[OverlayImage, CrashState], Outcome]


class CommandChecker:
    """Runs ``CMD {image}`` on a scratch image per state; exit status 0 passes."""

    def __init__(self, command: str, timeout: float = 60.0) -> None:
        if "{image}" not in command:
            raise ExploreError(f"--check {command!r} must contain {{image}}, where the crash state's image goes")
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise ExploreError(f"--check {command!r}: {exc}") from None
        if not self.argv:
            raise ExploreError("--check is empty")
        prog = self.argv[0]
        if shutil.which(prog) is None:
            raise ExploreError(f"checker {prog!r} not found (not an executable file, nor on PATH)")
        self.timeout = timeout

    def run(self, image: str) -> Outcome:
        argv = [a.replace("{image}", image) for a in self.argv]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return Outcome(False, f"checker timed out after {self.timeout} s", ("timeout",))
        except OSError as exc:
            raise ExploreError(f"checker {argv[0]!r} cannot run: {exc.strerror}") from None
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            return Outcome(True, out)
        return Outcome(False, f"exit status {proc.returncode}: {out[-2000:]}", ("checker",))


class ScratchImage:
    """A per-worker scratch copy of the base: a reflink clone per state where possible, else copy-and-restore."""

    def __init__(self, base: str, directory: str) -> None:
        self.base = base
        fd, self.path = tempfile.mkstemp(prefix="crash-state-", suffix=".img", dir=directory)
        os.close(fd)
        self.reflink = self._clone()
        if not self.reflink:
            shutil.copyfile(base, self.path)
        self._stamp = self._mtime()

    def _clone(self) -> bool:
        try:
            with open(self.base, "rb") as src, open(self.path, "wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return True
        except OSError:
            return False

    def _mtime(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size

    def prepare(self, overlay: Overlay) -> None:
        if self.reflink:
            self._clone()
        with open(self.path, "r+b") as f:
            for s, buf in overlay.sectors.items():
                os.pwrite(f.fileno(), buf, s * overlay.sector)
        self._stamp = self._mtime()

    def restore(self, overlay: Overlay, base_read: Callable[[int, int], bytes]) -> None:
        if self.reflink:
            return
        if self._mtime() != self._stamp:  # the checker wrote to the image: start again from the base
            shutil.copyfile(self.base, self.path)
        else:
            with open(self.path, "r+b") as f:
                for s, buf in overlay.sectors.items():
                    os.pwrite(f.fileno(), base_read(len(buf), s * overlay.sector), s * overlay.sector)
        self._stamp = self._mtime()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def check_base(base: str, log: WriteLog) -> None:
    if os.path.isdir(base):
        raise ExploreError(f"{base}: is a directory, not a base image")
    try:
        size = os.stat(base).st_size
    except FileNotFoundError:
        raise ExploreError(f"{base}: no such base image") from None
    except OSError as exc:
        raise ExploreError(f"{base}: cannot read the base image: {exc.strerror}") from None
    if size != log.size:
        raise ExploreError(f"{base}: base image is {size} bytes, but the log was recorded on a {log.size}-byte disk")


def explore(
    log: WriteLog,
    mode: CacheMode,
    *,
    base: str | None = None,
    base_bytes: bytes | None = None,
    command: CommandChecker | None = None,
    checker: InProcessChecker | None = None,
    states: int = 200,
    seed: int = 0,
    sector: int = 512,
    jobs: int = 1,
    write_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    max_failures: int | None = None,
) -> Report:
    """Generate crash states for ``log`` under ``mode``, check each, and report.

    The base is a file (``base``) or bytes (``base_bytes``); the checker a command (run on a scratch image)
    or an in-process function (given an :class:`OverlayImage` of the state).
    """
    if sector not in (512, 4096):
        raise ExploreError(f"--sector must be 512 or 4096, not {sector}")
    if states < 1:
        raise ExploreError("--states must be at least 1")
    if jobs < 1:
        raise ExploreError("--jobs must be at least 1")
    if (command is None) == (checker is None):
        raise ExploreError("give exactly one checker")
    if base is not None:
        check_base(base, log)
        base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)

        def base_read(length: int, offset: int) -> bytes:
            return os.pread(base_fd, length, offset)
    else:
        assert base_bytes is not None
        if len(base_bytes) != log.size:
            raise ExploreError(
                f"base image is {len(base_bytes)} bytes, but the log was recorded on a {log.size}-byte disk"
            )
        base_fd = -1

        def base_read(length: int, offset: int) -> bytes:
            return bytes(base_bytes[offset : offset + length])

    model = CrashModel(log, mode, write_cache=write_cache)
    rng = random.Random(seed)
    report = Report(mode.name, seed, sector, len(log.entries), log.writes, len(model.barriers))
    seen: set[str] = set()
    work: list[tuple[CrashState, Overlay]] = []
    t0 = time.perf_counter()
    for state in generate(model, states, rng, sector):
        report.generated += 1
        ov = build_overlay(state, log, base_read, sector)
        key = ov.digest()
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        work.append((state, ov))
    report.prepare_seconds = time.perf_counter() - t0
    scratch_dir = tempfile.mkdtemp(prefix="cachemode-explore-")
    lock = threading.Lock()
    local = threading.local()
    scratches: list[ScratchImage] = []
    full_base: bytes | None = None
    if checker is not None:
        full_base = base_bytes if base_bytes is not None else base_read(log.size, 0)

    def check(item: tuple[CrashState, Overlay]) -> tuple[CrashState, Outcome]:
        state, ov = item
        if checker is not None:
            assert full_base is not None
            image = OverlayImage(full_base, ov.sectors, sector)
            return state, checker(image, state)
        assert command is not None and base is not None
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = ScratchImage(base, scratch_dir)
            with lock:
                scratches.append(scratch)
        scratch.prepare(ov)
        try:
            return state, command.run(scratch.path)
        finally:
            scratch.restore(ov, base_read)

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for state, outcome in pool.map(check, work):
                report.checked += 1
                report.by_kind[state.kind] += 1
                if outcome.ok:
                    report.passed += 1
                else:
                    report.failed += 1
                    for kind in outcome.kinds or ("failed",):
                        report.violations[kind] = report.violations.get(kind, 0) + 1
                    if max_failures is None or len(report.failures) < max_failures:
                        report.failures.append(
                            {"state": state.describe(), "output": outcome.output, "kinds": list(outcome.kinds)}
                        )
                if progress is not None:
                    progress(report.checked, len(work))
    finally:
        report.seconds = time.perf_counter() - start
        for s in scratches:
            report.materialise = "reflink" if s.reflink else "copy-once+restore"
            s.remove()
        shutil.rmtree(scratch_dir, ignore_errors=True)
        if base_fd >= 0:
            os.close(base_fd)
    return report
