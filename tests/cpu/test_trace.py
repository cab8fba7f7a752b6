"""Trace readers: din, extended din, lackey, binary and npz, and their error messages."""

from __future__ import annotations

import numpy as np
import pytest

from cachemode.cpu.trace import Trace, TraceError, guess_format, parse_bytes, read_trace
from cachemode.errors import CachemodeError


def rows(t: Trace):
    return list(zip(t.types.tolist(), t.addrs.tolist(), t.sizes.tolist(), strict=True))


def test_din_labels_rounding_prefixes_and_ignored_fields():
    text = b"2 130 4\ti1\n0 0xff2f83\n1 1A\n3 7 extra words\n  4 10\n0x5 20\n"
    t = parse_bytes(text, "din")
    assert rows(t) == [(2, 0x130, 4), (0, 0xFF2F80, 4), (1, 0x18, 4), (3, 0x4, 4), (4, 0x10, 4), (5, 0x20, 4)]
    assert t.types.dtype == np.int8 and t.addrs.dtype == np.uint64 and t.sizes.dtype == np.uint16


def test_din_without_trailing_newline_and_crlf():
    assert rows(parse_bytes(b"0 10\r\n1 20", "din")) == [(0, 0x10, 4), (1, 0x20, 4)]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (b"0 10\nz 20\n", 2, "non hex digit 'z' in label"),
        (b"0 10\n0 10\n1 2g\n", 3, "non hex digit 'g' in address"),
        (b"0 10\n1\n", 2, "short line"),
        (b"0 10\n\n0 10\n", 2, "empty line"),
        (b"7 10\n", 1, "label 7 is not an access type"),
        (b"0 123456789abcdef01\n", 1, "more than 16 hex digits"),
    ],
)
def test_din_errors_name_line_and_problem(text, line, fragment):
    with pytest.raises(TraceError) as exc:
        parse_bytes(text, "din", "t.din")
    msg = str(exc.value)
    assert msg.startswith(f"t.din: line {line}: ") and fragment in msg
    assert isinstance(exc.value, CachemodeError)


def test_extended_din_keeps_unaligned_addresses_and_sizes():
    t = parse_bytes(b"r 1003 8\nW 0x20 0x10\ni 40 4\nm 44 1\nc 0 0\nV 80 4\n", "xdin")
    assert rows(t) == [(0, 0x1003, 8), (1, 0x20, 16), (2, 0x40, 4), (3, 0x44, 1), (4, 0, 0), (5, 0x80, 4)]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"x 10 4\n", "unknown access type 'x'"),
        (b"r 10\n", "missing size"),
        (b"r 10 4q\n", "non hex digit 'q' in size"),
        (b"r 10 0\n", "size 0 is out of range"),
        (b"r 10 10000\n", "size 65536 is out of range"),
    ],
)
def test_extended_din_errors(text, fragment):
    with pytest.raises(TraceError, match="line 1: xdin format error: " + fragment):
        parse_bytes(text, "xdin")


def test_lackey_modify_becomes_read_then_write_and_pid_lines_are_skipped():
    text = (
        b"==123== Lackey, an example Valgrind tool\n"
        b"I  0400d7d4,8\n"
        b" S 7feff7eb8,8\n"
        b" L 7feff7ea0,8\n"
        b" M 0601040,4\n"
        b"==123== \n"
    )
    t = parse_bytes(text, "lackey")
    assert rows(t) == [(2, 0x400D7D4, 8), (1, 0x7FEFF7EB8, 8), (0, 0x7FEFF7EA0, 8), (0, 0x601040, 4), (1, 0x601040, 4)]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"I  0400d7d4,8\n X 10,4\n", "line 2: lackey format error: unknown lackey record 'X'"),
        (b" L 10 4\n", "line 1: lackey format error: missing ','"),
        (b" L 10,x\n", "line 1: lackey format error: non decimal digit 'x' in size"),
    ],
)
def test_lackey_errors(text, fragment):
    with pytest.raises(TraceError, match=fragment):
        parse_bytes(text, "lackey")


def test_binary_and_npz_round_trip(tmp_path):
    t = Trace.from_arrays([0, 1, 2, 3], [0x10, 0xFFFFFFF0, 0x30, 0x40], [4, 8, 16, 1])
    (tmp_path / "t.bin").write_bytes(t.to_binary())
    assert rows(read_trace(tmp_path / "t.bin")) == rows(t)
    t.save(tmp_path / "t.npz")
    assert rows(read_trace(tmp_path / "t.npz")) == rows(t)
    (tmp_path / "t.xdin").write_text(t.to_xdin())
    assert rows(read_trace(tmp_path / "t.xdin")) == rows(t)


def test_binary_errors(tmp_path):
    with pytest.raises(TraceError, match="not a whole number of 8-byte records"):
        parse_bytes(b"\0" * 12, "bin", "x.bin")
    bad = np.zeros(2, dtype=[("a", "<u4"), ("s", "<u2"), ("t", "u1"), ("p", "u1")])
    bad["t"][1] = 9
    with pytest.raises(TraceError, match="record 2: access type 9"):
        parse_bytes(bad.tobytes(), "bin", "x.bin")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "nope.din")
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(tmp_path / "nope.din", "pixie")


def test_guess_format():
    assert guess_format("a.din", b"") == "din"
    assert guess_format("trace", b"==1== Lackey\nI  04,4\n") == "lackey"
    assert guess_format("trace", b"r 10 4\n") == "xdin"
    assert guess_format("trace", b"2 130 4\n") == "din"
