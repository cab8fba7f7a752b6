"""A real application on the lab disk: SQLite, through apsw and a VFS whose files live on the disk.

SQLite's own pager decides when to write and when to sync; the VFS only maps its calls onto the disk:
``xWrite`` is a write, ``xSync`` is a FLUSH, and file sizes and existence live in one metadata sector per
file, written like any other data (so a size change is durable only after a sync, as ``fsync`` promises).
Layout: sector ``i`` (``i`` < 8) describes file slot ``i``; slot ``i``'s data starts at ``64 KiB + i x REGION``.
Slot 0 is the database, slot 1 its rollback journal. Temporary files live in memory.

The workload is a bank: ``ACCOUNTS`` accounts with 1000 each, then ``transfers`` transactions, each moving an
amount between two accounts and adding a ``history`` row. Every COMMIT that returns is marked in the write log.
The journal mode is PERSIST: its commit (zeroing the journal header) is synced whenever synchronous is not OFF,
so under FULL a returned COMMIT is durable. (DELETE mode would need synchronous=EXTRA for that: unlinking the
journal is not synced under FULL, by SQLite's design.)

Each crash state is then opened as SQLite would open it after the crash -- a hot journal is rolled back --
and checked: ``PRAGMA integrity_check``, the total balance, and that every COMMIT marked before the crash point
is present.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import tempfile
from dataclasses import dataclass

import apsw

from cachemode.disk.layer import Layer
from cachemode.execution import Executor
from cachemode.lab.disk import LabConfig, LabDisk
from cachemode.lab.explore import (
    Checker,
    CrashModel,
    CrashState,
    Outcome,
    OverlayImage,
    Progress,
    Report,
    explore,
)
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.record import MARK, read_log
from cachemode.modes import CacheMode, get_mode

KiB = 1024
META = struct.Struct("<4sBxxxQH")
META_MAGIC = b"CMFS"
DATA_START = 64 * KiB
REGION = 1024 * KiB
SLOTS = 3
DISK_SIZE = DATA_START + SLOTS * REGION
ACCOUNTS = 8
INITIAL = 1000
SUFFIXES = {"": 0, "-journal": 1, "-wal": 2}
DB_NAME = "bank.db"
_vfs_ids = itertools.count()


class _SingleProcessFile:
    """What both file kinds share: one process, one connection, so locking has nothing to guard."""

    def xLock(self, level: int) -> None:
        pass

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False


class _MemFile(_SingleProcessFile):
    """A temporary file SQLite asked for (name None): kept in memory, gone at close."""

    def __init__(self) -> None:
        self.data = bytearray()

    def xRead(self, amount: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + amount])

    def xWrite(self, data: bytes, offset: int) -> None:
        if len(self.data) < offset:
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + len(data)] = data

    def xTruncate(self, size: int) -> None:
        del self.data[size:]

    def xSync(self, flags: int) -> None:
        pass

    def xFileSize(self) -> int:
        return len(self.data)

    def xSectorSize(self) -> int:
        return 512

    def xDeviceCharacteristics(self) -> int:
        return 0

    def xClose(self) -> None:
        pass


class _DiskFile(_SingleProcessFile):
    """A file in a slot of the disk."""

    def __init__(self, fs: DiskFS, slot: int) -> None:
        self.fs = fs
        self.slot = slot

    @property
    def base(self) -> int:
        return DATA_START + self.slot * REGION

    def xRead(self, amount: int, offset: int) -> bytes:
        size = self.fs.sizes[self.slot]
        if offset >= size:
            return b""
        n = min(amount, size - offset)
        return self.fs.disk.pread(n, self.base + offset)

    def xWrite(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if end > REGION:
            raise apsw.FullError(f"file slot {self.slot} is full ({REGION} bytes)")
        self.fs.disk.pwrite(data, self.base + offset)
        if end > self.fs.sizes[self.slot]:
            self.fs.set_meta(self.slot, True, end)

    def xTruncate(self, size: int) -> None:
        self.fs.set_meta(self.slot, True, size)

    def xSync(self, flags: int) -> None:
        self.fs.disk.flush()

    def xFileSize(self) -> int:
        return self.fs.sizes[self.slot]

    def xSectorSize(self) -> int:
        return self.fs.sector

    def xDeviceCharacteristics(self) -> int:
        return 0

    def xClose(self) -> None:
        pass


class DiskFS(apsw.VFS):
    """A VFS whose few files live in fixed slots of a disk (any object with pread/pwrite/flush)."""

    def __init__(self, disk: Layer | LabDisk, *, sector: int = 512) -> None:
        self.disk = disk
        self.sector = sector
        self.sizes = [0] * SLOTS
        self.exists = [False] * SLOTS
        for slot in range(SLOTS):
            magic, exists, size, _ = META.unpack(disk.pread(META.size, slot * 512))
            if magic == META_MAGIC:
                self.exists[slot] = bool(exists)
                self.sizes[slot] = min(size, REGION)
        self.vfsname = f"cachemode-lab-{next(_vfs_ids)}"
        super().__init__(self.vfsname, "", maxpathname=256)

    def set_meta(self, slot: int, exists: bool, size: int) -> None:
        self.exists[slot] = exists
        self.sizes[slot] = size
        self.disk.pwrite(META.pack(META_MAGIC, int(exists), size, slot).ljust(512, b"\0"), slot * 512)

    def _slot(self, name: str) -> int:
        base = os.path.basename(str(name))
        for suffix, slot in SUFFIXES.items():
            if base == DB_NAME + suffix:
                return slot
        raise apsw.CantOpenError(f"the lab VFS holds only {DB_NAME} and its journal, not {base}")

    def xOpen(self, name: object, flags: list[int]) -> object:
        if name is None:
            return _MemFile()
        slot = self._slot(name.filename() if isinstance(name, apsw.URIFilename) else str(name))
        if not self.exists[slot]:
            if not flags[0] & apsw.SQLITE_OPEN_CREATE:
                raise apsw.CantOpenError(f"{name}: no such file")
            self.set_meta(slot, True, 0)
        return _DiskFile(self, slot)

    def xAccess(self, pathname: str, flags: int) -> bool:
        try:
            slot = self._slot(pathname)
        except apsw.CantOpenError:
            return False
        return self.exists[slot]

    def xDelete(self, filename: str, syncdir: bool) -> None:
        slot = self._slot(filename)
        self.set_meta(slot, False, 0)
        if syncdir:
            self.disk.flush()

    def xFullPathname(self, name: str) -> str:
        return "/" + os.path.basename(name)

    def close(self) -> None:
        self.unregister()


def _connect(fs: DiskFS) -> apsw.Connection:
    return apsw.Connection("/" + DB_NAME, vfs=fs.vfsname, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)


@dataclass
class Workload:
    log: str
    base: bytes
    commits: int
    mode: str
    synchronous: str


def run_workload(
    mode: str | CacheMode,
    log_path: str,
    *,
    synchronous: str = "FULL",
    transfers: int = 40,
    seed: int = 0,
    config: LabConfig | None = None,
) -> Workload:
    """Create the bank on a fresh lab disk, then record ``transfers`` transactions into ``log_path``."""
    synchronous = synchronous.upper()
    if synchronous not in ("FULL", "NORMAL", "OFF", "EXTRA"):
        raise ValueError(f"unknown synchronous setting {synchronous!r}")
    cfg = config or LabConfig(host_cache=64 * 1024 * KiB, disk_cache=8 * 1024 * KiB)
    medium = MemoryDisk(DISK_SIZE)
    cfg = LabConfig(cfg.host_cache, cfg.disk_cache, None, log_path, cfg.block)
    lab = LabDisk(medium, get_mode(mode), cfg)
    assert lab.recorder is not None
    lab.recorder.enabled = False  # the set-up is not part of the run
    fs = DiskFS(lab)
    rng = random.Random(seed)
    try:
        db = _connect(fs)
        db.execute("PRAGMA journal_mode=PERSIST")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA temp_store=MEMORY")
        with db:
            db.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
            db.execute(
                "CREATE TABLE history(id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER, note TEXT)"
            )
            db.executemany("INSERT INTO accounts VALUES (?, ?)", [(i, INITIAL) for i in range(ACCOUNTS)])
        # The starting point: everything durable, the host's caches empty.
        lab.top.lower.flush()  # below the mode layer, which may drop it (unsafe)
        for layer in lab.volatile_layers:
            layer.writeback_all()
        base = bytes(medium.data)
        lab.recorder.enabled = True
        commits = 0
        for txn in range(1, transfers + 1):
            src, dst = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            with db:
                db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
                db.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
                db.execute(
                    "INSERT INTO history VALUES (?, ?, ?, ?, ?)", (txn, src, dst, amount, "x" * rng.randint(0, 600))
                )
            lab.mark(f"commit {txn}")
            commits += 1
        db.close()
    finally:
        lab.recorder.stop()
        fs.close()
    return Workload(log_path, base, commits, get_mode(mode).name, synchronous)


class SqliteChecker(Checker):
    """The bank's invariants, checked in process on an :class:`~cachemode.lab.explore.OverlayImage` of a state.

    It holds only the COMMIT marks (entry index, transaction id), so it travels to Dask workers cheaply.
    """

    needs_file = False

    def __init__(self, model: CrashModel, sector: int = 512) -> None:
        self.commits = [
            (e.index, int(e.name.split()[1]))
            for e in model.log.entries
            if e.kind == MARK and e.name.startswith("commit ")
        ]
        self.sector = sector

    def describe(self) -> str:
        return "SQLite bank invariants"

    def check_image(self, image: OverlayImage, state: CrashState) -> Outcome:
        required = {tid for index, tid in self.commits if index < state.crash_point}
        return _check(image, required, self.sector)


def check_state(image: Layer | bytearray, state: CrashState, model: CrashModel, sector: int = 512) -> Outcome:
    """Open the crashed database as SQLite would after a reboot, and check it.

    ``image`` is the state's disk: an :class:`~cachemode.lab.explore.OverlayImage` (copy-on-write over the
    base, so the rollback of a hot journal costs only what it writes) or a bytearray.
    """
    required = {int(name.split()[1]) for name in model.marks_before(state.crash_point) if name.startswith("commit ")}
    return _check(image, required, sector)


def _check(image: Layer | bytearray, required: set[int], sector: int) -> Outcome:
    fs = DiskFS(image if isinstance(image, Layer) else MemoryDisk(image), sector=sector)
    problems: list[str] = []
    kinds: list[str] = []
    try:
        db = _connect(fs)
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                kinds.append("integrity")
                problems.append("integrity_check: " + "; ".join(map(str, rows[:3])))
            total = db.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()
            if total != (ACCOUNTS * INITIAL, ACCOUNTS):
                kinds.append("balance")
                problems.append(
                    f"total balance {total[0]} over {total[1]} accounts, expected {ACCOUNTS * INITIAL} over {ACCOUNTS}"
                )
            present = {r[0] for r in db.execute("SELECT id FROM history")}
            missing = sorted(required - present)
            if missing:
                kinds.append("lost-commit")
                problems.append(f"{len(missing)} committed transactions missing (first {missing[:5]})")
        finally:
            db.close()
    except apsw.Error as exc:
        kinds.append("unreadable")
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        fs.close()
    return Outcome(not kinds, "; ".join(problems), tuple(kinds))


def sqlite_lab(
    mode: str | CacheMode,
    *,
    synchronous: str = "FULL",
    states: int = 200,
    seed: int = 0,
    transfers: int = 40,
    sector: int = 512,
    log_path: str | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> tuple[Workload, Report]:
    """Run the bank workload under ``mode`` and explore its crash states; returns the workload and report."""
    cache_mode = get_mode(mode)
    with tempfile.TemporaryDirectory(prefix="cachemode-sqlite-") as tmp:
        path = log_path or os.path.join(tmp, "bank.wlog")
        work = run_workload(cache_mode, path, synchronous=synchronous, transfers=transfers, seed=seed)
        log = read_log(path)
    model = CrashModel(log, cache_mode)
    report = explore(
        log,
        cache_mode,
        base_bytes=work.base,
        checker=SqliteChecker(model, sector),
        states=states,
        seed=seed,
        sector=sector,
        progress=progress,
        executor=executor,
    )
    return work, report
