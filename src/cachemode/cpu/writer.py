"""Writing traces chunk by chunk, in the format the file name asks for, compressed if it ends in .gz, .xz or .zst.

| suffix | written as |
|---|---|
| ``.npz`` | cachemode's compact NumPy form (the one format held whole until :meth:`TraceWriter.close`) |
| ``.bin`` | Dinero IV's binary records (32-bit addresses) |
| ``.din`` | Dinero's din (``label addr``): 4-byte, 4-aligned references only |
| ``.lackey`` | raw valgrind lackey text (only when recording, from valgrind's own output) |
| anything else | extended din (``t addr size``) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cachemode.cpu import _core
from cachemode.cpu.trace import Trace, TraceError, concat

_COMPRESSORS = (".gz", ".xz", ".zst", ".zstd")


def output_kind(path: str | os.PathLike) -> str:
    """The format a file name asks for: npz, bin, din, lackey or xdin."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _COMPRESSORS:
        suffix = Path(p.stem).suffix.lower()
    return {".npz": "npz", ".bin": "bin", ".din": "din", ".lackey": "lackey"}.get(suffix, "xdin")


def _open(path: str) -> BinaryIO:
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "wb", compresslevel=6)
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "wb", preset=1)
    if suffix in (".zst", ".zstd"):
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"), closefd=True)
    return open(path, "wb")


class TraceWriter:
    """Append trace chunks (or raw lackey text, for ``.lackey``) to a file; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.kind = output_kind(path)
        if self.kind == "npz" and Path(self.path).suffix.lower() != ".npz":
            raise TraceError(f"{self.path}: .npz traces are compressed already; write plain .npz")
        self.count = 0
        self._held: list[Trace] = []
        try:
            self._f = None if self.kind == "npz" else _open(self.path)
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write trace: {exc.strerror or exc}") from None

    def write(self, trace: Trace) -> None:
        if self.kind == "lackey":
            raise TraceError(f"{self.path}: lackey text can only come from valgrind; use .xdin, .bin or .npz")
        self.count += len(trace)
        if self.kind == "npz":
            self._held.append(trace)
            return
        if self.kind == "bin":
            data = trace.to_binary()
        else:
            if self.kind == "din" and len(trace) and (np.any(trace.sizes != 4) or np.any(trace.addrs & np.uint64(3))):
                raise TraceError(f"{self.path}: din holds 4-byte, 4-aligned references only; use .xdin")
            data = _core.format_text(trace.types, trace.addrs, trace.sizes, self.kind == "din")
        self._put(data)

    def write_raw(self, data: bytes) -> None:
        """Raw lackey text (``.lackey`` only)."""
        self._put(data)

    def _put(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write trace: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            if self.kind == "npz":
                concat(self._held).save(self.path)
                self._held = []
            elif self._f is not None:
                self._f.close()
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write trace: {exc.strerror or exc}") from None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
