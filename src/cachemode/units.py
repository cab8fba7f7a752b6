"""Parsing and printing of sizes, shared by every command that takes one (``--create 1G``, ``--host-cache 64M``)."""

from __future__ import annotations

import re

from cachemode.errors import CachemodeError

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class SizeError(CachemodeError):
    """A size argument that is not a non-negative integer with an optional K/M/G/T suffix."""


def parse_size(text: str | int) -> int:
    """Parse ``"4096"``, ``"64k"``, ``"1G"``, ``"2MiB"`` into bytes (binary multiples, as qemu-img does)."""
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise SizeError(f"invalid size {text!r} (expected a number with an optional k/M/G/T suffix)")
    number, suffix, _ = match.groups()
    return int(number) * _SUFFIX[suffix.lower()]


def format_size(n: int) -> str:
    """Print a byte count compactly in binary units (``1 GiB``, ``4 KiB``, ``1536 B``)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def plural(n: int, noun: str) -> str:
    """``1 write``, ``2 writes``: a count with its noun agreeing."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
