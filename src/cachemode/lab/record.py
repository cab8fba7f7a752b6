"""The write log: every completed write, trim and zero with its data, and every FLUSH and FUA.

Entries are appended in **completion** order, as dm-log-writes logs them. A FLUSH is logged when it completes
and carries ``covers``: how many entries had been logged when the flush was *issued*. Those entries, and only
those, are durable once the flush completes -- a write still in flight when the flush arrived is not covered
(the dm-log-writes worked example ``W1, W2, W3, C3, C2, Wflush, C1, Cflush`` logs ``W3, W2, W1, FLUSH(covers=2)``,
which a replay reads as ``W3, W2, flush, W1``). A FUA write is durable on its own completion. MARK entries
name points in the workload (``dmsetup message ... mark``): the SQLite workload marks each returned COMMIT.

File format (little-endian): an 16-byte header ``b"CMWLOG1\\n"`` + u64 disk size, then entries, each a
40-byte head ``<B kind, B flags, H 0, I crc32 of data, Q offset, Q length, Q covers, Q data length>``
followed by the data (writes: the bytes written; marks: the name in UTF-8). The CRC makes a garbled log
an error rather than a wrong answer.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from dataclasses import dataclass

from cachemode.disk.layer import Layer
from cachemode.errors import CachemodeError

MAGIC = b"CMWLOG1\n"
HEADER = struct.Struct("<8sQ")
ENTRY = struct.Struct("<BBHIQQQQ")

WRITE, TRIM, ZERO, FLUSH, MARK = 1, 2, 3, 4, 5
KIND_NAMES = {WRITE: "write", TRIM: "trim", ZERO: "zero", FLUSH: "flush", MARK: "mark"}
F_FUA = 1


class LogError(CachemodeError):
    """The write log cannot be read: missing, truncated or garbled."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    index: int
    kind: int
    offset: int = 0
    length: int = 0
    fua: bool = False
    covers: int = 0
    data: bytes = b""

    @property
    def is_write(self) -> bool:
        """A write-type entry: it changes the disk (write, trim, zero)."""
        return self.kind in (WRITE, TRIM, ZERO)

    @property
    def name(self) -> str:
        return self.data.decode("utf-8", "replace") if self.kind == MARK else KIND_NAMES[self.kind]


@dataclass
class WriteLog:
    size: int
    entries: list[LogEntry]

    @property
    def writes(self) -> int:
        return sum(1 for e in self.entries if e.is_write)

    @property
    def flushes(self) -> int:
        return sum(1 for e in self.entries if e.kind == FLUSH)


class LogWriter:
    """Appends entries to a log file; thread-safe; each entry is written with one write(2)."""

    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LogError(f"{self.path}: cannot create the write log: {exc.strerror}") from None
        os.write(self.fd, HEADER.pack(MAGIC, size))
        self.lock = threading.Lock()
        self.count = 0
        self.closed = False

    def append(
        self, kind: int, offset: int = 0, length: int = 0, *, fua: bool = False, covers: int = 0, data: bytes = b""
    ) -> int:
        """Append an entry (the caller may hold ``lock`` already: it is re-entrant-free, so use _append)."""
        with self.lock:
            return self._append(kind, offset, length, fua=fua, covers=covers, data=data)

    def _append(self, kind: int, offset: int, length: int, *, fua: bool, covers: int, data: bytes) -> int:
        if self.closed:
            return -1
        head = ENTRY.pack(kind, F_FUA if fua else 0, 0, zlib.crc32(data), offset, length, covers, len(data))
        os.write(self.fd, head + data)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


def read_log(path: str | os.PathLike[str]) -> WriteLog:
    """Read and validate a write log; a missing, truncated or garbled file is a :class:`LogError`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise LogError(f"{path}: no such write log") from None
    except IsADirectoryError:
        raise LogError(f"{path}: is a directory, not a write log") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read the write log: {exc.strerror}") from None
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise LogError(f"{path}: not a cachemode write log (bad magic; record one with --record)")
    _, size = HEADER.unpack_from(raw, 0)
    pos = HEADER.size
    entries: list[LogEntry] = []
    while pos < len(raw):
        i = len(entries)
        if pos + ENTRY.size > len(raw):
            raise LogError(f"{path}: entry {i} at byte {pos}: truncated header")
        kind, flags, _, crc, offset, length, covers, dlen = ENTRY.unpack_from(raw, pos)
        pos += ENTRY.size
        if kind not in KIND_NAMES:
            raise LogError(f"{path}: entry {i} at byte {pos - ENTRY.size}: unknown entry kind {kind}")
        if pos + dlen > len(raw):
            raise LogError(f"{path}: entry {i} at byte {pos - ENTRY.size}: truncated data")
        data = raw[pos : pos + dlen]
        pos += dlen
        if zlib.crc32(data) != crc:
            raise LogError(f"{path}: entry {i}: data checksum mismatch (garbled log)")
        if kind == WRITE and dlen != length:
            raise LogError(f"{path}: entry {i}: write of {length} bytes carries {dlen} bytes of data")
        if kind in (WRITE, TRIM, ZERO) and offset + length > size:
            raise LogError(f"{path}: entry {i}: range {offset}+{length} beyond the {size}-byte disk")
        if kind == FLUSH and covers > i:
            raise LogError(f"{path}: entry {i}: flush covers {covers} entries, only {i} precede it")
        entries.append(LogEntry(i, kind, offset, length, bool(flags & F_FUA), covers, data))
    return WriteLog(size, entries)


class Recorder(Layer):
    """Logs every completed request that passes through it (put it at the top: it records the guest's view)."""

    def __init__(
        self, lower: Layer, path: str | os.PathLike[str], *, enabled: bool = True, barriers: bool = True
    ) -> None:
        super().__init__(lower)
        self.log = LogWriter(path, lower.size)
        self.enabled = enabled
        # False below a device that ignores FLUSH and FUA: then neither is a barrier, and none is logged.
        self.barriers = barriers

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        self.lower.pwrite(data, offset, fua=fua)
        if self.enabled:
            payload = bytes(data)
            self.log.append(WRITE, offset, len(payload), fua=fua and self.barriers, data=payload)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.lower.trim(offset, length, fua=fua)
        if self.enabled:
            self.log.append(TRIM, offset, length, fua=fua and self.barriers)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        self.lower.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        if self.enabled:
            self.log.append(ZERO, offset, length, fua=fua and self.barriers)

    def flush(self) -> None:
        with self.log.lock:
            covers = self.log.count  # what had completed when the flush was issued
        self.lower.flush()
        if self.enabled and self.barriers:
            self.log.append(FLUSH, covers=covers)

    def mark(self, name: str) -> None:
        """Name this point of the workload in the log."""
        if self.enabled:
            self.log.append(MARK, data=name.encode())

    def stop(self) -> None:
        """Stop recording and close the log (at a crash: nothing after it belongs to this run)."""
        self.enabled = False
        self.log.close()

    def close(self) -> None:
        try:
            self.lower.close()
        finally:
            self.stop()

    def describe(self) -> str:
        return f"Recorder log={self.log.path}"
