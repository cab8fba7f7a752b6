"""Trace readers: din, extended din, Valgrind lackey and binary traces, parsed in chunks into NumPy arrays.

A trace is three parallel arrays: ``types`` (int8, Dinero's access types: 0 read, 1 write, 2 instruction
fetch, 3 misc, 4 copy-back, 5 invalidate), ``addrs`` (uint64) and ``sizes`` (uint16). Text formats are parsed
by the compiled core over the raw bytes; a malformed line stops the parse with a :class:`TraceError` naming the
file, the line number and what is wrong with it. :class:`TraceReader` reads any length in chunks (memory stays
bounded), from a file or stdin, decompressing gzip, xz, zstd and bzip2 by magic number.

Formats (``fmt``):

- ``din`` (Dinero ``-informat d``): ``<hex label> <hex address> [ignored...]``; the address is rounded down
  to a multiple of 4 and every access is 4 bytes. Labels 0-5 as above.
- ``xdin`` (Dinero ``-informat D``): ``<r|w|i|m|c|v> <hex address> <hex size>``; addresses are not rounded.
- ``lackey``: ``valgrind --tool=lackey --trace-mem=yes`` output (``I  addr,size``, `` L``, `` S``, `` M``;
  sizes decimal); ``M`` becomes a read then a write; ``==pid==`` lines are skipped.
- ``bin`` (Dinero ``-informat b``): 8-byte little-endian records ``<u32 address, u16 size, u8 type, pad>``.
- ``npz``: cachemode's own compact form (:meth:`Trace.save`).
"""

from __future__ import annotations

import io
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from cachemode.cpu import _core
from cachemode.errors import CachemodeError

T = TypeVar("T")
READ, WRITE, IFETCH, MISC, COPYBACK, INVALIDATE = 0, 1, 2, 3, 4, 5
TYPE_NAMES = ("read", "write", "ifetch", "misc", "copyback", "invalidate")
FORMATS = ("din", "xdin", "lackey", "bin", "npz")
_FMT_CODE = {"din": 0, "xdin": 1, "lackey": 2}

BIN_DTYPE = np.dtype([("addr", "<u4"), ("size", "<u2"), ("type", "u1"), ("pad", "u1")])


class TraceError(CachemodeError):
    """A trace that cannot be read: names the file, the line (or record) and the problem."""


@dataclass
class Trace:
    """A parsed trace: parallel arrays of access type, address and size."""

    types: np.ndarray
    addrs: np.ndarray
    sizes: np.ndarray

    def __post_init__(self) -> None:
        self.types = np.ascontiguousarray(self.types, dtype=np.int8)
        self.addrs = np.ascontiguousarray(self.addrs, dtype=np.uint64)
        self.sizes = np.ascontiguousarray(self.sizes, dtype=np.uint16)
        if not (len(self.types) == len(self.addrs) == len(self.sizes)):
            raise TraceError("trace arrays differ in length")

    def __len__(self) -> int:
        return len(self.types)

    @classmethod
    def from_arrays(cls, types, addrs, sizes=None) -> Trace:
        """Build a trace from array-likes; ``sizes`` defaults to 4 bytes each."""
        types = np.asarray(types)
        if sizes is None:
            sizes = np.full(len(types), 4, dtype=np.uint16)
        bad = (np.asarray(types) < 0) | (np.asarray(types) > 5)
        if bad.any():
            i = int(np.argmax(bad))
            raise TraceError(f"record {i + 1}: access type {int(types[i])} is not 0-5")
        return cls(types, addrs, sizes)

    def slice(self, start: int, stop: int | None = None) -> Trace:
        return Trace(self.types[start:stop], self.addrs[start:stop], self.sizes[start:stop])

    def save(self, path: str | os.PathLike) -> None:
        """Save in cachemode's compact form (a NumPy ``.npz``)."""
        with open(path, "wb") as f:
            np.savez(f, types=self.types, addrs=self.addrs, sizes=self.sizes)

    def to_binary(self) -> bytes:
        """Dinero IV's binary format (``-informat b``): addresses must fit in 32 bits."""
        if len(self) and int(self.addrs.max()) > 0xFFFFFFFF:
            raise TraceError("binary format holds 32-bit addresses only")
        rec = np.zeros(len(self), dtype=BIN_DTYPE)
        rec["addr"] = self.addrs
        rec["size"] = self.sizes
        rec["type"] = self.types
        return rec.tobytes()

    def to_xdin(self) -> str:
        """Extended din text (one ``<letter> <hexaddr> <hexsize>`` line per record)."""
        return _core.format_text(self.types, self.addrs, self.sizes, False).decode()


_ERRORS = {
    1: "non hex digit {ch} in label",
    2: "non hex digit {ch} in address",
    3: "short line",
    4: "non hex digit {ch} in size",
    5: "missing size",
    6: "label {val} is not an access type (0 read, 1 write, 2 ifetch, 3 misc, 4 copy-back, 5 invalidate)",
    7: "unknown access type {ch} (expected r, w, i, m, c or v)",
    8: "address has more than 16 hex digits",
    9: "size {val} is out of range (1-65535)",
    10: "unknown lackey record {ch} (expected I, L, S or M)",
    11: "missing ',' between address and size",
    12: "non decimal digit {ch} in size",
    13: "empty line",
}


TEXT_BLOCK = 4 << 20  # bytes read at a time from a text trace
MAX_LINE = 16 << 20  # a "line" longer than this is not a trace line: stop instead of buffering it
CHUNK_RECORDS = 1 << 18  # records per chunk when streaming: memory stays bounded whatever the trace length


def _text_error(name: str, fmt: str, err: int, line: int, ch: int, val: int) -> TraceError:
    chs = repr(chr(ch)) if 32 <= ch < 127 else f"(code 0x{ch:x})"
    return TraceError(f"{name}: line {line}: {fmt} format error: {_ERRORS[err].format(ch=chs, val=val)}")


def _parse_lines(body, fmt: str, name: str, lines: list[int], chunk: int) -> Iterator[Trace]:
    """Parse whole lines (``body`` ends at a line end, or is the end of the trace) into chunks of records.

    ``lines[0]`` counts the lines parsed so far (for error messages) and is kept up to date."""
    code = _FMT_CODE[fmt]
    view = memoryview(body)
    pos = 0
    while pos < len(view):
        types = np.empty(chunk, np.int8)
        addrs = np.empty(chunk, np.uint64)
        sizes = np.empty(chunk, np.uint16)
        k, used, lines[0], err, ch, val = _core.parse_text(view[pos:], code, types, addrs, sizes, lines[0])
        if err:
            raise _text_error(name, fmt, err, lines[0], ch, val)
        pos += used
        if k:
            yield Trace(types[:k], addrs[:k], sizes[:k])


def _iter_text(f: BinaryIO, fmt: str, name: str, chunk: int) -> Iterator[Trace]:
    lines = [0]
    buf = bytearray(TEXT_BLOCK)
    view = memoryview(buf)
    have = 0  # bytes in buf: the unparsed end of the last block (an incomplete line), then what was read
    while True:
        if have == len(buf):  # one line fills the buffer
            if len(buf) >= MAX_LINE:
                raise TraceError(f"{name}: line {lines[0] + 1}: {fmt} format error: no line end in {MAX_LINE:,} bytes")
            view.release()
            buf.extend(bytes(len(buf)))
            view = memoryview(buf)
        got = f.readinto(view[have:])
        if not got:
            if have:  # a last line without a line end
                yield from _parse_lines(view[:have], fmt, name, lines, chunk)
            return
        have += got
        cut = buf.rfind(b"\n", 0, have) + 1
        if cut:
            yield from _parse_lines(view[:cut], fmt, name, lines, chunk)
            buf[: have - cut] = view[cut:have]
            have -= cut


def parse_text(data: bytes, fmt: str, name: str = "<trace>") -> Trace:
    """Parse text trace bytes in format ``din``, ``xdin`` or ``lackey``."""
    if fmt not in _FMT_CODE:
        raise TraceError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    cap = 2 * data.count(b"\n") + 4  # enough for every line, lackey's M lines giving two records
    return concat(list(_parse_lines(data, fmt, name, [0], cap)))


def concat(chunks: list[Trace]) -> Trace:
    """One trace from chunks (no copy for a single chunk)."""
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return Trace(np.empty(0, np.int8), np.empty(0, np.uint64), np.empty(0, np.uint16))
    return Trace(*(np.concatenate([getattr(c, f) for c in chunks]) for f in ("types", "addrs", "sizes")))


def _check_binary(rec: np.ndarray, name: str, first: int) -> Trace:
    bad = rec["type"] > 5
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{name}: record {first + i + 1}: access type {int(rec['type'][i])} is not 0-5")
    return Trace(rec["type"].astype(np.int8), rec["addr"].astype(np.uint64), rec["size"].copy())


def parse_binary(data: bytes, name: str = "<trace>") -> Trace:
    """Parse Dinero IV's binary format (8-byte records)."""
    if len(data) % BIN_DTYPE.itemsize:
        raise TraceError(
            f"{name}: binary trace is {len(data)} bytes, not a whole number of 8-byte records "
            f"(record {len(data) // 8 + 1} is cut short)"
        )
    return _check_binary(np.frombuffer(data, dtype=BIN_DTYPE), name, 0)


def _iter_binary(f: BinaryIO, name: str, chunk: int) -> Iterator[Trace]:
    carry = b""
    first = 0
    while True:
        block = f.read(chunk * BIN_DTYPE.itemsize)
        if not block:
            if carry:
                total = first * BIN_DTYPE.itemsize + len(carry)
                raise TraceError(
                    f"{name}: binary trace is {total} bytes, not a whole number of 8-byte records "
                    f"(record {first + 1} is cut short)"
                )
            return
        data = carry + block if carry else block
        whole = len(data) - len(data) % BIN_DTYPE.itemsize
        carry = data[whole:]
        if whole:
            rec = np.frombuffer(data, dtype=BIN_DTYPE, count=whole // BIN_DTYPE.itemsize)
            yield _check_binary(rec, name, first)
            first += len(rec)


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"))
_COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".bz2")


def guess_format(path: str | os.PathLike, head: bytes) -> str:
    """Pick a format from the file name (a compression suffix aside), falling back to the first line's shape."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _COMPRESSED_SUFFIXES:
        suffix = Path(p.stem).suffix.lower()
    by_suffix = {".din": "din", ".xdin": "xdin", ".lackey": "lackey", ".bin": "bin", ".npz": "npz"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if head.startswith(b"PK"):
        return "npz"
    first = head.split(b"\n", 1)[0].strip()
    if first.startswith(b"==") or b"," in first:
        return "lackey"
    if first[:1].lower() in (b"r", b"w", b"i", b"m", b"c", b"v") and len(first.split()) >= 3:
        return "xdin"
    return "din"


def _decompressor(kind: str, raw: BinaryIO) -> BinaryIO:
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(raw)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2File(raw)
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


class _Borrowed(io.RawIOBase):
    """A caller's binary file seen through a buffer (for ``peek``) without closing it when done."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if hasattr(self._f, "readinto"):
            return self._f.readinto(b)
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_trace(path: str | os.PathLike | BinaryIO) -> BinaryIO:
    """Open a trace for reading (``-`` is stdin; an open binary file is used as it is), decompressing gzip, xz,
    zstd or bzip2 found by magic number. The result can ``peek`` at the first bytes without consuming them."""
    if hasattr(path, "read"):
        raw = path
    else:
        name = os.fspath(path)
        try:
            raw = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
        except OSError as exc:
            raise TraceError(f"{name}: cannot read trace: {exc.strerror or exc}") from None
    if not hasattr(raw, "peek"):
        raw = io.BufferedReader(_Borrowed(raw))
    head = raw.peek(8)[:8]
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            f = _decompressor(kind, raw)
            return f if hasattr(f, "peek") else io.BufferedReader(f)
    return raw


class TraceReader:
    """A trace read in chunks of at most ``chunk`` records, so that memory stays bounded whatever its length.

    ``path`` is a file name, ``-`` for stdin, or an open binary file (not closed here); compressed files are read
    transparently. ``fmt`` is one of :data:`FORMATS`, or None to decide from the name and the first line. ``.npz``
    files are read whole.
    Iterating yields :class:`Trace` chunks; a malformed line stops with a :class:`TraceError` naming it.
    """

    def __init__(
        self, path: str | os.PathLike | BinaryIO, fmt: str | None = None, *, chunk: int | None = None, name=None
    ):
        if fmt is not None and fmt not in FORMATS:
            raise TraceError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.name = name or (getattr(path, "name", "<trace>") if hasattr(path, "read") else os.fspath(path))
        self._own = not hasattr(path, "read") and self.name != "-"
        self.chunk = max(int(chunk or CHUNK_RECORDS), 2)
        self._f = open_trace(path)
        try:
            self.fmt = fmt or guess_format(self.name, self._f.peek(4096)[:4096])
        except (OSError, EOFError, ValueError) as exc:
            self.close()
            raise TraceError(f"{self.name}: cannot read trace: {exc}") from None

    def __iter__(self) -> Iterator[Trace]:
        try:
            if self.fmt == "npz":
                whole = _load_npz(self._f.read(), self.name)
                for lo in range(0, len(whole), self.chunk):
                    yield whole.slice(lo, lo + self.chunk)
            elif self.fmt == "bin":
                yield from _iter_binary(self._f, self.name, self.chunk)
            else:
                yield from _iter_text(self._f, self.fmt, self.name, self.chunk)
        except (OSError, EOFError) as exc:  # a truncated or corrupt compressed file
            raise TraceError(f"{self.name}: cannot read trace: {exc}") from None
        except Exception as exc:
            if type(exc).__module__ == "zstandard" or "zstd" in type(exc).__name__.lower():
                raise TraceError(f"{self.name}: cannot read trace: {exc}") from None
            raise

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_ahead(chunks: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``chunks`` as a thread produces them, at most ``depth`` ahead: reading and parsing the
    next chunks overlaps simulating this one (both release the GIL). Stopping early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in chunks:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((end, exc))

    thread = threading.Thread(target=produce, name="cachemode-trace-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)  # a reader blocked on an interactive stdin is a daemon: it cannot hold up the exit


def read_trace(path: str | os.PathLike, fmt: str | None = None) -> Trace:
    """Read a whole trace file (``-`` for stdin); ``fmt`` is one of :data:`FORMATS` or None to guess.

    For traces too long to hold, iterate over a :class:`TraceReader` instead (``simulate`` does)."""
    with TraceReader(path, fmt) as reader:
        return concat(list(reader))


def _load_npz(data: bytes, name: str) -> Trace:
    try:
        with np.load(io.BytesIO(data)) as z:
            return Trace(z["types"], z["addrs"], z["sizes"])
    except Exception as exc:  # a corrupt archive can raise many things
        raise TraceError(f"{name}: not a cachemode .npz trace: {exc}") from None


def parse_bytes(data: bytes, fmt: str, name: str = "<trace>") -> Trace:
    """Parse a whole trace held in memory."""
    if fmt == "bin":
        return parse_binary(data, name)
    if fmt == "npz":
        return _load_npz(data, name)
    return parse_text(data, fmt, name)
