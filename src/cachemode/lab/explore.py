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
(CrashMonkey's reordering mode). States are built as sector overlays over a shared pool and de-duplicated by
exact identity (which sectors, which content), both in :mod:`cachemode.lab.states`.

Checking runs on an :class:`~cachemode.execution.Executor` (local threads, or Dask workers) as batches of
overlays; each worker materialises them (:mod:`cachemode.lab.checking`). The outcomes are folded in state
order, so the report does not depend on where or in which order the checks ran.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cachemode.execution import Executor, LocalExecutor, shared_file
from cachemode.lab.checking import (
    BaseImage,
    CheckContext,
    Checker,
    CommandChecker,
    ExploreError,
    FunctionChecker,
    Outcome,
    OverlayImage,
    check_batch,
    kill_checkers,
    release,
    verify_checker,
)
from cachemode.lab.record import FLUSH, MARK, WriteLog
from cachemode.lab.states import Overlay, StateBuilder
from cachemode.modes import CacheMode

__all__ = [
    "Checker",
    "CommandChecker",
    "CrashModel",
    "CrashState",
    "ExploreError",
    "FunctionChecker",
    "Outcome",
    "OverlayImage",
    "Progress",
    "Report",
    "explore",
    "generate",
]

Progress = Callable[[str, int, int], None]  # (phase "building" or "checking", done, total)
InProcessChecker = Callable[[OverlayImage, "CrashState"], Outcome]


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
    where: str = "local"  # where the checks ran (like the timings, not part of the answer)

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
            "where": self.where,
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


def _place_base(executor: Executor, base: str | None, base_bytes: bytes | None, size: int) -> BaseImage:
    """How workers get the base: the shared path when every worker sees the same image there, else the bytes."""
    if base is None:
        assert base_bytes is not None
        return BaseImage(size, data=bytes(base_bytes))
    path = os.path.abspath(base)
    digest = shared_file(executor, path)
    if digest is not None:
        return BaseImage(size, path=path, digest=digest)
    with open(path, "rb") as f:
        return BaseImage(size, data=f.read())


def _verify_checker(executor: Executor, checker: Checker) -> None:
    """Fail before any work when the checker cannot run where the work will (a missing program)."""
    found = executor.everywhere(verify_checker, checker)
    problems = {worker: (host, problem) for worker, (host, problem) in found.items() if problem}
    if not problems:
        return
    host, problem = next(iter(problems.values()))
    if not executor.remote:
        raise ExploreError(problem)
    raise ExploreError(
        f"{problem} on {host} (on {len(problems)} of the cluster's workers: {', '.join(sorted(problems))})"
    )


def _batches(count: int, workers: int, remote: bool) -> list[range]:
    """Split ``count`` states into tasks: one each here, a few per task on a cluster (task overhead ~1 ms)."""
    size = 1 if not remote else max(1, min(16, count // (workers * 8)))
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def explore(
    log: WriteLog,
    mode: CacheMode,
    *,
    base: str | None = None,
    base_bytes: bytes | None = None,
    checker: Checker | InProcessChecker | None = None,
    command: CommandChecker | None = None,
    states: int = 200,
    seed: int = 0,
    sector: int = 512,
    jobs: int = 1,
    executor: Executor | None = None,
    write_cache: bool = True,
    progress: Progress | None = None,
    max_failures: int | None = None,
) -> Report:
    """Generate crash states for ``log`` under ``mode``, check each, and report.

    The base is a file (``base``) or bytes (``base_bytes``); the checker a :class:`Checker` (``command`` is the
    same for a :class:`CommandChecker`) or an in-process function given an :class:`OverlayImage` of the state.
    The checks run on ``executor`` (default: ``jobs`` local threads); the report does not depend on where.
    """
    if sector not in (512, 4096):
        raise ExploreError(f"--sector must be 512 or 4096, not {sector}")
    if states < 1:
        raise ExploreError("--states must be at least 1")
    if jobs < 1:
        raise ExploreError("--jobs must be at least 1")
    if (command is None) == (checker is None):
        raise ExploreError("give exactly one checker")
    chk = command if command is not None else checker
    if not isinstance(chk, Checker):
        assert chk is not None
        chk = FunctionChecker(chk)
    if base is not None:
        check_base(base, log)
        if not chk.needs_file:
            with open(base, "rb") as f:
                base_bytes, base = f.read(), None
    elif base_bytes is None or len(base_bytes) != log.size:
        got = "no" if base_bytes is None else f"{len(base_bytes)} bytes of"
        raise ExploreError(f"{got} base image, but the log was recorded on a {log.size}-byte disk")
    own = executor is None
    ex = executor if executor is not None else LocalExecutor(jobs)
    token = None
    try:
        _verify_checker(ex, chk)
        place = _place_base(ex, base, base_bytes, log.size)
        report, work, builder = _build(log, mode, place, states, seed, sector, write_cache, progress)
        ctx = CheckContext(chk, place, builder.pool, sector)
        token = ctx.token
        report.where = ex.where
        shared = ex.share(ctx)
        order = _batches(len(work), ex.workers, ex.remote)
        tasks = [[(i, work[i][0], work[i][1].runs) for i in r] for r in order]
        outcomes: dict[int, Outcome] = {}
        start = time.perf_counter()
        running = ex.map(check_batch, tasks, shared)
        try:
            for _, (results, how) in running:
                report.materialise = how
                outcomes.update(results)
                if progress is not None:
                    progress("checking", len(outcomes), len(work))
        except BaseException:  # Ctrl-C or a failed task: stop the checkers still running, wherever they are
            with contextlib.suppress(Exception):
                ex.everywhere(kill_checkers, token)
            raise
        finally:
            running.close()
            report.seconds = time.perf_counter() - start
        _fold(report, [s for s, _ in work], outcomes, max_failures)
        return report
    finally:
        if token is not None:
            with contextlib.suppress(Exception):
                ex.everywhere(release, token)
        if own:
            ex.close()


def _build(
    log: WriteLog,
    mode: CacheMode,
    place: BaseImage,
    states: int,
    seed: int,
    sector: int,
    write_cache: bool,
    progress: Progress | None,
) -> tuple[Report, list[tuple[CrashState, Overlay]], StateBuilder]:
    """Generate, build and de-duplicate the states: the report so far, the distinct states, their builder."""
    t0 = time.perf_counter()
    if place.data is not None:
        data = place.data

        def base_read(length: int, offset: int) -> bytes:
            return data[offset : offset + length]
    else:
        assert place.path is not None
        fd = os.open(place.path, os.O_RDONLY | os.O_CLOEXEC)

        def base_read(length: int, offset: int) -> bytes:
            return os.pread(fd, length, offset)

    try:
        model = CrashModel(log, mode, write_cache=write_cache)
        report = Report(mode.name, seed, sector, len(log.entries), log.writes, len(model.barriers))
        builder = StateBuilder(log, sector, base_read)
        work = []
        for state in generate(model, states, random.Random(seed), sector):
            report.generated += 1
            overlay = builder.build(state.durable, state.kept, state.torn)
            if overlay is None:
                report.duplicates += 1
            else:
                work.append((state, overlay))
            if progress is not None and (report.generated % 16 == 0 or report.generated == states):
                progress("building", report.generated, states)
        if progress is not None:
            progress("building", states, states)
    finally:
        if place.data is None:
            os.close(fd)
    report.prepare_seconds = time.perf_counter() - t0
    return report, work, builder


def _fold(report: Report, states: list[CrashState], outcomes: dict[int, Outcome], max_failures: int | None) -> None:
    """Count the outcomes in state order, so the report is the same whatever order they completed in."""
    for i, state in enumerate(states):
        outcome = outcomes[i]
        report.checked += 1
        report.by_kind[state.kind] += 1
        if outcome.ok:
            report.passed += 1
            continue
        report.failed += 1
        for kind in outcome.kinds or ("failed",):
            report.violations[kind] = report.violations.get(kind, 0) + 1
        if max_failures is None or len(report.failures) < max_failures:
            report.failures.append({"state": state.describe(), "output": outcome.output, "kinds": list(outcome.kinds)})
