"""Trace readers: din, extended din, Valgrind lackey and binary traces, parsed once into NumPy arrays.

A trace is three parallel arrays: ``types`` (int8, Dinero's access types: 0 read, 1 write, 2 instruction
fetch, 3 misc, 4 copy-back, 5 invalidate), ``addrs`` (uint64) and ``sizes`` (uint16). Text formats are parsed
by a numba kernel over the raw bytes; a malformed line stops the parse with a :class:`TraceError` naming the
file, the line number and what is wrong with it.

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

import os
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from cachemode.errors import CachemodeError

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
        letters = "rwimcv"
        return "".join(
            f"{letters[t]} {a:x} {s:x}\n"
            for t, a, s in zip(self.types.tolist(), self.addrs.tolist(), self.sizes.tolist(), strict=True)
        )


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
    14: "more records than lines (internal error)",
}


_HEX = np.full(256, -1, np.int8)  # hex digit value by byte, -1 if not a hex digit
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX[_ch] = 10 + _i


@numba.njit(cache=True, inline="always")
def _blank(c):
    return c == 32 or c == 9 or c == 13


@numba.njit(cache=True)
def _parse_text(buf, fmt, cap):
    """Parse ``buf`` (uint8) into arrays of ``cap`` records (enough for every line; nothing is reallocated in
    the loop, which keeps it free of reference counting).

    Returns (types, addrs, sizes, n, err, err_line, err_char, err_val)."""
    n = len(buf)
    types = np.empty(cap, np.int8)
    addrs = np.empty(cap, np.uint64)
    sizes = np.empty(cap, np.uint16)
    k = 0
    line = 0
    i = 0
    while i < n:
        line += 1
        # skip leading blanks
        while i < n and _blank(buf[i]):
            i += 1
        if i >= n:
            break
        c = buf[i]
        if c == 10:
            if fmt == 2:
                i += 1
                continue
            return types, addrs, sizes, k, 13, line, 0, 0
        if k + 2 > cap:  # cannot happen: the caller sizes the arrays from the line count
            return types, addrs, sizes, k, 14, line, 0, 0
        atype = 0
        if fmt == 0:
            v = _HEX[c]
            if v < 0:
                return types, addrs, sizes, k, 1, line, c, 0
            atype = v
            i += 1
            if i < n and (buf[i] == 120 or buf[i] == 88) and atype == 0:
                i += 1
            while i < n and _HEX[buf[i]] >= 0:
                atype = atype * 16 + _HEX[buf[i]]
                if atype > 255:
                    atype = 255
                i += 1
            if i >= n or buf[i] == 10:
                return types, addrs, sizes, k, 3, line, 0, 0
            if not _blank(buf[i]):
                return types, addrs, sizes, k, 1, line, buf[i], 0
            if atype > 5:
                return types, addrs, sizes, k, 6, line, 0, atype
        elif fmt == 1:
            if c == 114 or c == 82:
                atype = 0
            elif c == 119 or c == 87:
                atype = 1
            elif c == 105 or c == 73:
                atype = 2
            elif c == 109 or c == 77:
                atype = 3
            elif c == 99 or c == 67:
                atype = 4
            elif c == 118 or c == 86:
                atype = 5
            else:
                return types, addrs, sizes, k, 7, line, c, 0
            i += 1
            if i >= n or buf[i] == 10:
                return types, addrs, sizes, k, 3, line, 0, 0
            if not _blank(buf[i]):
                return types, addrs, sizes, k, 7, line, c, 0
        else:
            if c == 61:  # '=': valgrind's own ==pid== lines
                while i < n and buf[i] != 10:
                    i += 1
                i += 1
                continue
            if c == 73:
                atype = 2
            elif c == 76:
                atype = 0
            elif c == 83:
                atype = 1
            elif c == 77:
                atype = 6  # modify: read then write
            else:
                return types, addrs, sizes, k, 10, line, c, 0
            i += 1
            if i >= n or buf[i] == 10:
                return types, addrs, sizes, k, 3, line, 0, 0
            if not _blank(buf[i]):
                return types, addrs, sizes, k, 10, line, c, 0
        # whitespace before the address
        while i < n and _blank(buf[i]):
            i += 1
        if i >= n or buf[i] == 10:
            return types, addrs, sizes, k, 3, line, 0, 0
        if _HEX[buf[i]] < 0:
            return types, addrs, sizes, k, 2, line, buf[i], 0
        addr = np.uint64(0)
        ndig = 0
        first = _HEX[buf[i]]
        i += 1
        if i < n and (buf[i] == 120 or buf[i] == 88) and first == 0:
            i += 1
        else:
            addr = np.uint64(first)
            if first != 0:
                ndig = 1
        while i < n and _HEX[buf[i]] >= 0:
            d = _HEX[buf[i]]
            if ndig > 0 or d != 0:
                ndig += 1
            addr = addr * np.uint64(16) + np.uint64(d)
            i += 1
        if ndig > 16:
            return types, addrs, sizes, k, 8, line, 0, 0
        size = 4
        if fmt == 0:
            if i < n and not (_blank(buf[i]) or buf[i] == 10):
                return types, addrs, sizes, k, 2, line, buf[i], 0
            addr = addr & ~np.uint64(3)
        elif fmt == 1:
            if i < n and not (_blank(buf[i]) or buf[i] == 10):
                return types, addrs, sizes, k, 2, line, buf[i], 0
            while i < n and _blank(buf[i]):
                i += 1
            if i >= n or buf[i] == 10:
                return types, addrs, sizes, k, 5, line, 0, 0
            if _HEX[buf[i]] < 0:
                return types, addrs, sizes, k, 4, line, buf[i], 0
            size = _HEX[buf[i]]
            i += 1
            if i < n and (buf[i] == 120 or buf[i] == 88) and size == 0:
                i += 1
            while i < n and _HEX[buf[i]] >= 0:
                size = size * 16 + _HEX[buf[i]]
                if size > 1 << 20:
                    size = 1 << 20
                i += 1
            if i < n and not (_blank(buf[i]) or buf[i] == 10):
                return types, addrs, sizes, k, 4, line, buf[i], 0
            if size > 65535 or (size == 0 and atype < 4):
                return types, addrs, sizes, k, 9, line, 0, size
        else:
            if i >= n or buf[i] != 44:
                return types, addrs, sizes, k, 11, line, 0, 0
            i += 1
            if i >= n or not (48 <= buf[i] <= 57):
                if i >= n or buf[i] == 10:
                    return types, addrs, sizes, k, 5, line, 0, 0
                return types, addrs, sizes, k, 12, line, buf[i], 0
            size = 0
            while i < n and 48 <= buf[i] <= 57:
                size = size * 10 + (buf[i] - 48)
                if size > 1 << 20:
                    size = 1 << 20
                i += 1
            if i < n and not (_blank(buf[i]) or buf[i] == 10):
                return types, addrs, sizes, k, 12, line, buf[i], 0
            if size > 65535 or size == 0:
                return types, addrs, sizes, k, 9, line, 0, size
        # rest of the line is ignored
        while i < n and buf[i] != 10:
            i += 1
        i += 1
        if atype == 6:
            types[k] = 0
            addrs[k] = addr
            sizes[k] = size
            k += 1
            atype = 1
        types[k] = atype
        addrs[k] = addr
        sizes[k] = size
        k += 1
    return types, addrs, sizes, k, 0, line, 0, 0


def parse_text(data: bytes, fmt: str, name: str = "<trace>") -> Trace:
    """Parse text trace bytes in format ``din``, ``xdin`` or ``lackey``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    lines = data.count(b"\n") + 2
    cap = 2 * lines if fmt == "lackey" else lines  # lackey's M lines give two records
    types, addrs, sizes, k, err, line, ch, val = _parse_text(buf, _FMT_CODE[fmt], cap)
    if err:
        chs = repr(chr(ch)) if 32 <= ch < 127 else f"(code 0x{ch:x})"
        msg = _ERRORS[int(err)].format(ch=chs, val=int(val))
        raise TraceError(f"{name}: line {int(line)}: {fmt} format error: {msg}")
    if k < len(types) // 2:  # do not keep a mostly empty buffer alive
        return Trace(types[:k].copy(), addrs[:k].copy(), sizes[:k].copy())
    return Trace(types[:k], addrs[:k], sizes[:k])


def parse_binary(data: bytes, name: str = "<trace>") -> Trace:
    """Parse Dinero IV's binary format (8-byte records)."""
    if len(data) % BIN_DTYPE.itemsize:
        raise TraceError(
            f"{name}: binary trace is {len(data)} bytes, not a whole number of 8-byte records "
            f"(record {len(data) // 8 + 1} is cut short)"
        )
    rec = np.frombuffer(data, dtype=BIN_DTYPE)
    bad = rec["type"] > 5
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{name}: record {i + 1}: access type {int(rec['type'][i])} is not 0-5")
    return Trace(rec["type"].astype(np.int8), rec["addr"].astype(np.uint64), rec["size"].copy())


def guess_format(path: str | os.PathLike, head: bytes) -> str:
    """Pick a format from the file name, falling back to the first line's shape."""
    suffix = Path(path).suffix.lower()
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


def read_trace(path: str | os.PathLike, fmt: str | None = None) -> Trace:
    """Read a trace file (``-`` for stdin); ``fmt`` is one of :data:`FORMATS` or None to guess."""
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    name = str(path)
    try:
        if name == "-":
            import sys

            data = sys.stdin.buffer.read()
        else:
            data = Path(path).read_bytes()
    except OSError as exc:
        raise TraceError(f"{name}: cannot read trace: {exc.strerror or exc}") from None
    if fmt is None:
        fmt = guess_format(name, data[:4096])
    return parse_bytes(data, fmt, name)


def parse_bytes(data: bytes, fmt: str, name: str = "<trace>") -> Trace:
    if fmt == "bin":
        return parse_binary(data, name)
    if fmt == "npz":
        import io

        try:
            with np.load(io.BytesIO(data)) as z:
                return Trace(z["types"], z["addrs"], z["sizes"])
        except Exception as exc:  # a corrupt archive can raise many things
            raise TraceError(f"{name}: not a cachemode .npz trace: {exc}") from None
    if fmt not in _FMT_CODE:
        raise TraceError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    return parse_text(data, fmt, name)
