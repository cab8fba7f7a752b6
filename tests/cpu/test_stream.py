"""Traces streamed in chunks give the counts of whole-trace runs, from files, compressed files and stdin, in
bounded memory."""

from __future__ import annotations

import bz2
import gzip
import importlib
import io
import json
import lzma
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemode.cpu import CacheConfig, Hierarchy, Level, Trace, simulate
from cachemode.cpu import trace as trace_mod
from cachemode.cpu.dinero import main_text
from cachemode.cpu.trace import TraceReader, parse_bytes, parse_text

from .test_cli import cm
from .test_dinero import LCG_EXPECTED, lcg_trace, report_rows

simulate_mod = importlib.import_module("cachemode.cpu.simulate")  # the package's `simulate` is the function


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 7 records, text read 61 bytes at a time, 5 events per pass through the hierarchy: every chunk
    boundary falls somewhere awkward (inside runs of block-spanning references, flush and stat intervals)."""
    monkeypatch.setattr(trace_mod, "CHUNK_RECORDS", 7)
    monkeypatch.setattr(trace_mod, "TEXT_BLOCK", 61)
    monkeypatch.setattr(simulate_mod, "CHUNK", 5)


def hierarchy() -> Hierarchy:
    return Hierarchy(
        [
            Level(icache=CacheConfig(512, 16, 1), dcache=CacheConfig("1k", 32, 4, walloc="f", ccc=True)),
            Level(unified=CacheConfig("4k", 64, 3, repl="fifo", wback="n")),
        ]
    )


@pytest.mark.parametrize("flushcount", [0, 7, 37, 1000])
def test_chunked_file_run_equals_whole_trace_run(tmp_path, monkeypatch, flushcount):
    path = tmp_path / "lcg.xdin"
    path.write_text(lcg_trace())
    whole = simulate(hierarchy(), parse_bytes(path.read_bytes(), "xdin"), flushcount=flushcount, threads=1)
    assert whole.caches[1].multiblock > 1000  # block-spanning references all through the trace
    monkeypatch.setattr(trace_mod, "CHUNK_RECORDS", 7)
    monkeypatch.setattr(trace_mod, "TEXT_BLOCK", 61)
    monkeypatch.setattr(simulate_mod, "CHUNK", 5)
    chunked = simulate(hierarchy(), path, flushcount=flushcount, threads=1)
    assert chunked.to_dict() == whole.to_dict()


@pytest.mark.parametrize("options", list(LCG_EXPECTED))
def test_dinero_figures_hold_with_tiny_chunks(tiny_chunks, options):
    # includes -flushcount 1000 -maxcount 3500 -skipcount 7: skip, flush and max counts across chunk boundaries
    text, _ = main_text([*options.split(), "-informat", "D"], lcg_trace().encode())
    got = report_rows(text)
    for cache, rows in LCG_EXPECTED[options].items():
        for label, values in rows.items():
            assert got[cache][label] == values, (cache, label)


@pytest.mark.parametrize(
    ("extra", "tables"),
    [
        ("-stat-interval 500", 1 + 8),
        ("-stat-interval 7 -flushcount 7", 1 + 4000 // 7),
        ("-stat-interval 1000 -flushcount 300 -skipcount 5 -maxcount 2999", 1 + 2),
    ],
)
def test_stat_intervals_and_flushes_do_not_depend_on_chunking(monkeypatch, extra, tables):
    args = [*["-l1-usize", "1k", "-l1-ubsize", "16", "-l1-uassoc", "2", "-l1-uccc", "-informat", "D"], *extra.split()]
    whole, _ = main_text(args, lcg_trace().encode())
    monkeypatch.setattr(trace_mod, "CHUNK_RECORDS", 3)
    monkeypatch.setattr(trace_mod, "TEXT_BLOCK", 17)
    monkeypatch.setattr(simulate_mod, "CHUNK", 2)
    chunked, _ = main_text(args, lcg_trace().encode())
    assert chunked == whole
    assert chunked.count("l1-ucache") == tables


def test_text_read_in_small_blocks_keeps_line_numbers(tiny_chunks, tmp_path):
    lines = ["r 10 4\n"] * 50 + ["r 10 q\n"]
    path = tmp_path / "bad.xdin"
    path.write_text("".join(lines))
    with pytest.raises(trace_mod.TraceError, match=r"bad.xdin: line 51: xdin format error: non hex digit 'q'"):
        list(TraceReader(path))


def test_lines_longer_than_the_read_buffer(tiny_chunks):
    data = b"0 10 " + b"x" * 300 + b"\n1 20\n2 30 " + b"y" * 500  # ignored fields; the last line has no line end
    chunks = list(TraceReader(io.BytesIO(data), "din"))
    assert [a for c in chunks for a in c.addrs.tolist()] == [0x10, 0x20, 0x30]


def test_binary_records_split_across_reads(tiny_chunks, tmp_path):
    t = parse_bytes(lcg_trace().encode(), "xdin")
    path = tmp_path / "t.bin"
    path.write_bytes(t.to_binary())
    chunks = list(TraceReader(path))
    assert max(len(c) for c in chunks) == 7
    assert np.array_equal(np.concatenate([c.addrs for c in chunks]), t.addrs)
    path.write_bytes(t.to_binary()[:-3])
    with pytest.raises(trace_mod.TraceError, match=f"record {len(t)} is cut short"):
        list(TraceReader(path))


COMPRESS = {
    "gz": gzip.compress,
    "xz": lzma.compress,
    "zst": lambda b: zstandard.ZstdCompressor().compress(b),
    "bz2": bz2.compress,
}


@pytest.mark.parametrize("kind", list(COMPRESS))
def test_compressed_traces_by_suffix_and_by_magic(tmp_path, kind):
    data = lcg_trace().encode()
    expected = simulate(CacheConfig("1k", 16, 2), parse_bytes(data, "xdin")).to_dict()
    named = tmp_path / f"t.xdin.{kind}"
    named.write_bytes(COMPRESS[kind](data))
    anonymous = tmp_path / "trace"  # no suffix at all: compression by magic number, format by first line
    anonymous.write_bytes(COMPRESS[kind](data))
    assert simulate(CacheConfig("1k", 16, 2), named).to_dict() == expected
    assert simulate(CacheConfig("1k", 16, 2), anonymous).to_dict() == expected


def test_truncated_compressed_trace_is_one_error(tmp_path):
    path = tmp_path / "t.xdin.gz"
    path.write_bytes(gzip.compress(lcg_trace().encode())[:-200])
    p = cm("sim", str(path), "--level", "u:1k:16:2")
    err = p.stderr.decode()
    assert p.returncode == 2 and "t.xdin.gz: cannot read trace" in err and "Traceback" not in err


def test_stdin_for_sim_and_dinero_compressed_or_not():
    data = lcg_trace().encode()
    p = cm("sim", "-", "--level", "u:1k:16:2:ccc", "--json", stdin=gzip.compress(data))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["caches"][0]["misses"]["total"] == 4627  # Dinero IV's figure for this trace
    p = cm("dinero", "-l1-usize", "1k", "-l1-ubsize", "16", "-l1-uassoc", "2", stdin=lzma.compress(data))
    assert p.returncode == 0, p.stderr
    assert report_rows(p.stdout.decode())["l1-ucache"]["Demand Misses"][0] == 4627


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["0", "1", "2", "3", "4", "5", "02", "0x1", " 1", "7"]),
            st.sampled_from(["0", "10", "0x10", "00ff", "7fff1234", "abcdef0123456789", "1abcdef0123456789", "g1"]),
            st.sampled_from(["", " 4", "\t9", " x y", "\r", "q"]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_din_fast_path_agrees_with_the_general_parser(lines):
    """Lines ending in a line end take the fast path where they can; the same text without the final line end
    goes through the general parser. Both must give the same records, or the same error."""
    text = "\n".join(f"{a} {b}{c}" for a, b, c in lines)

    def parse(data: bytes):
        try:
            t = parse_text(data, "din", "t")
            return t.types.tolist(), t.addrs.tolist()
        except trace_mod.TraceError as exc:
            return str(exc)

    assert parse((text + "\n").encode()) == parse(text.encode())


DIN_GENERATOR = (
    "import sys, numpy as np\n"
    "from cachemode.cpu import _core\n"
    "n, step = int(sys.argv[1]), 1 << 20\n"
    "rng = np.random.default_rng(5)\n"
    "for lo in range(0, n, step):\n"
    "    k = min(step, n - lo)\n"
    "    types = rng.choice(np.array([0, 1, 2], np.int8), k)\n"
    "    addrs = (rng.integers(0, 1 << 24, k) * 4).astype(np.uint64)\n"
    "    sys.stdout.buffer.write(_core.format_text(types, addrs, np.full(k, 4, np.uint16), True))\n"
)


PEAK_WRAPPER = (
    "import atexit, sys\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('VmHWM', line.split()[1], file=sys.stderr)\n"
    "atexit.register(hwm)\n"
    "from cachemode.cli import main\n"
    "main(sys.argv[1:])\n"
)


def test_long_trace_on_stdin_runs_in_bounded_memory():
    """12M references (about 130 MB of din, 130 MB as arrays) streamed through `cachemode dinero` on stdin:
    peak memory stays far below what holding the trace would take."""
    n = 12_000_000
    cmd = [sys.executable, "-c", PEAK_WRAPPER, "dinero", "-l1-isize", "32k", "-l1-ibsize", "64", "-l1-dsize", "32k",
           "-l1-dbsize", "64", "-l1-dassoc", "8", "-l2-usize", "1m", "-l2-ubsize", "64", "-l2-uassoc", "16",
           "-informat", "d"]  # fmt: skip
    gen = subprocess.Popen([sys.executable, "-c", DIN_GENERATOR, str(n)], stdout=subprocess.PIPE)
    proc = subprocess.Popen(cmd, stdin=gen.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gen.stdout.close()  # the generator writes n din lines, a chunk at a time, into cachemode's stdin
    out, err = proc.communicate(timeout=240)
    assert gen.wait(timeout=60) == 0
    assert proc.returncode == 0, err.decode()
    fetches = report_rows(out.decode())
    assert fetches["l1-icache"]["Demand Fetches"][0] + fetches["l1-dcache"]["Demand Fetches"][0] == n
    peak_kib = int(err.decode().split("VmHWM")[1].split()[0])
    assert peak_kib < 256 * 1024, f"peak {peak_kib / 1024:.0f} MiB"


def test_trace_from_an_open_file_object_is_not_closed():
    buf = io.BytesIO(b"r 10 4\nw 20 8\n")
    chunks = list(TraceReader(buf, "xdin"))
    assert not buf.closed and sum(map(len, chunks)) == 2
    assert isinstance(chunks[0], Trace)
