"""The command line, run as a user would: `python -m cachemode sim|dinero|trace ...`, exit codes included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .test_dinero import lcg_trace, report_rows


def cm(*args: str, stdin: bytes | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachemode", *args], input=stdin, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def xdin(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cpu") / "lcg.xdin"
    p.write_text(lcg_trace())
    return p


def test_sim_table_and_json(xdin):
    p = cm("sim", str(xdin), "--level", "u:1k:16:2:ccc")
    assert p.returncode == 0, p.stderr
    assert "l1-ucache" in p.stdout.decode() and "4,627" in p.stdout.decode()  # Dinero IV's figure (test_dinero)
    p = cm("sim", str(xdin), "--level", "i:512:16:1", "--level", "d:1k:32:4:walloc=f", "--level", "u:4k:64:4", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    names = [c["name"] for c in doc["caches"]]
    assert names == ["l1-icache", "l1-dcache", "l2-ucache"]
    assert doc["caches"][0]["misses"]["total"] == 780 and doc["caches"][1]["misses"]["total"] == 3123


def test_sim_toml_config(xdin, tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text('[[level]]\nu = { size = "1k", block = 16, assoc = 2, ccc = true }\n')
    p = cm("sim", str(xdin), "--config", str(cfg), "--json")
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)["caches"][0]
    assert c["conflict"]["total"] == 549 and c["bytes_to_next_level"] == 29024


def test_dinero_reads_stdin(xdin):
    p = cm("dinero", "-l1-usize", "1k", "-l1-ubsize", "16", "-l1-uassoc", "2", "-l1-uccc", stdin=xdin.read_bytes())
    assert p.returncode == 0, p.stderr
    rows = report_rows(p.stdout.decode())["l1-ucache"]
    assert rows["Conflict misses"] == [549, 78, 471, 236, 168, 67]
    assert p.stdout.decode().rstrip().endswith("---Execution complete.")


def test_dinero_starts_without_click_or_toml():
    """`cachemode dinero` takes Dinero's options itself: its start-up (part of its speed) imports neither the
    click command line nor the TOML reader."""
    code = (
        "import sys\n"
        "from cachemode.cli import main\n"
        "try:\n"
        "    main(['dinero', '-l1-usize', '1k', '-l1-ubsize', '16', '-l1-uassoc', '1', '-informat', 'd'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'click' in sys.modules, 'tomllib' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], input=b"0 0\n1 40\n", capture_output=True, timeout=120)
    out = p.stdout.decode()
    assert "---Simulation complete." in out and " Demand Fetches\t\t           2\t" in out, out
    assert out.strip().endswith("exit 0 False False"), out


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["dinero", "-l1-usize", "1k"], b"", "block size must be specified"),
        (["dinero", "-l1-usize", "1k", "-l1-ubsize", "16", "-l1-ufetch", "a"], b"", "prefetch"),
        (["dinero", "-l1-usize", "1k", "-l1-ubsize", "16", "-informat", "d"], b"0 10\n1 zz\n", "line 2"),
        (["dinero", "-l1-usize", "1k", "-l1-ubsize", "16"], b"r 10 4\nq 10 4\n", "unknown access type 'q'"),
    ],
)
def test_errors_are_one_line_and_status_2(args, stdin, fragment):
    p = cm(*args, stdin=stdin)
    err = p.stderr.decode()
    assert p.returncode == 2
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_sim_errors(tmp_path, xdin):
    bad = tmp_path / "bad.din"
    bad.write_text("0 10\n0 10\n9 10\n")
    for args, fragment in [
        (["sim", str(bad), "--level", "u:1k:16:1"], "bad.din: line 3: din format error: label 9"),
        (["sim", str(xdin), "--level", "u:1k:16:0"], "associativity '0' is not a number of ways (1 or more) or 'full'"),
        (["sim", str(xdin)], "no caches"),
        (["sim", str(tmp_path / "missing.din"), "--level", "u:1k:16:1"], "cannot read trace"),
    ]:
        p = cm(*args)
        err = p.stderr.decode()
        assert p.returncode == 2, (args, err)
        assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_sweep_with_plot(xdin, tmp_path):
    png = tmp_path / "curves.png"
    p = cm("sim", "sweep", str(xdin), "--sizes", "256,512,1k", "--assoc", "1,2,full", "--block", "16", "--plot",
           str(png), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    pts = json.loads(p.stdout)
    assert len(pts) == 9
    rate = {(d["size"], d["assoc"]): d["miss_rate"] for d in pts}
    assert rate[(1024, 2)] == pytest.approx(4627 / 6866)  # the Dinero IV figure for 1k/16/2
    assert all(rate[(256, a)] >= rate[(1024, a)] for a in (1, 2, "full"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_trace_record_real_program(tmp_path):
    out = tmp_path / "true.npz"
    p = cm("trace", "record", "-o", str(out), "--", "/bin/true", timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.exists()
    p = cm("sim", str(out), "--level", "i:32k:64:8", "--level", "d:32k:64:8", "--json")
    assert p.returncode == 0, p.stderr
    caches = json.loads(p.stdout)["caches"]
    assert caches[0]["fetches"]["ifetch"] > 1000 and caches[1]["fetches"]["read"] > 100


def test_trace_record_needs_a_command():
    p = cm("trace", "record", "-o", "x.npz")
    assert p.returncode == 2 and "Traceback" not in p.stderr.decode()


def test_trace_convert_round_trip(xdin, tmp_path):
    npz, binary = tmp_path / "t.npz", tmp_path / "t.bin"
    assert cm("trace", "convert", str(xdin), str(npz)).returncode == 0
    assert cm("trace", "convert", str(npz), str(binary)).returncode == 0
    outs = [json.loads(cm("sim", str(p), "--level", "u:1k:16:2", "--json").stdout) for p in (xdin, npz, binary)]
    assert outs[0] == outs[1] == outs[2]
    assert outs[0]["caches"][0]["misses"]["total"] == 4627  # Dinero IV's figure (test_dinero)


def test_sim_without_arguments_or_with_help_shows_how_it_is_typed():
    for args in ([], ["--help"], ["-h"]):
        p = cm("sim", *args)
        out = p.stdout.decode()
        assert p.returncode == 0, p.stderr
        assert "Usage: cachemode sim TRACE (--level SPEC ... | --config FILE)" in out
        assert "cachemode sim sweep TRACE" in out and "run" not in out.split("Options:")[0].split()


def test_a_side_without_any_cache_is_named_in_one_warning(tmp_path):
    din = tmp_path / "t.din"
    din.write_text("2 100\n0 200\n2 104\n1 300\n")
    p = cm("sim", str(din), "--level", "d:1k:16:2", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode().splitlines() == [
        "cachemode sim: warning: 2 instruction fetches reach no cache (the hierarchy has no i or u cache): they go "
        "straight to memory, uncounted, as in Dinero IV"
    ]
    assert json.loads(p.stdout)["caches"][0]["fetches"]["total"] == 2
    p = cm("sim", str(din), "--level", "d:1k:16:2", "--level", "u:4k:32:5")  # fetches reach L2: no warning
    assert p.returncode == 0 and p.stderr == b""


def test_synth_blocking_lowers_the_miss_rate(tmp_path):
    rates = {}
    for kind in ("mm-naive", "mm-transposed", "mm-blocked"):
        out = tmp_path / f"{kind}.xdin.gz"
        p = cm("trace", "synth", kind, "-n", "48", "--tile", "8", "-o", str(out))
        assert p.returncode == 0, p.stderr
        p = cm("sim", str(out), "--level", "d:4k:64:4", "--json")
        rates[kind] = json.loads(p.stdout)["caches"][0]["miss_rate"]["total"]
    assert rates["mm-naive"] > 2 * rates["mm-blocked"] and rates["mm-naive"] > 2 * rates["mm-transposed"]


@pytest.mark.parametrize(
    ("kind", "opts", "refs"),
    [
        ("mm-naive", ["-n", "8"], 8 * 8 * 17),
        ("mm-blocked", ["-n", "8", "--tile", "4"], 8 * 8 * 2 * (4 + 1) * 2),
        ("stream", ["-n", "100"], 300),
        ("strided", ["--size", "4k", "--stride", "256", "--passes", "2"], 32),
        ("random", ["--size", "1m", "--count", "500"], 500),
        ("chase", ["--size", "64k", "--count", "2048"], 2048),
        ("stencil", ["-n", "10"], 6 * 64),
    ],
)
def test_synth_kinds_write_the_references_they_describe(tmp_path, kind, opts, refs):
    out = tmp_path / "t.bin"
    p = cm("trace", "synth", kind, *opts, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size == 8 * refs
    p = cm("trace", "synth", "mm-blocked", "-n", "10", "--tile", "4", "-o", str(out))
    assert p.returncode == 2 and "tile 4 must divide the matrix size 10" in p.stderr.decode()


def test_chase_visits_every_node_once_per_lap(tmp_path):
    from cachemode.cpu.synth import chase

    t = chase(64 * 1024, 2 * 1024, node=64)
    lap = t.addrs[:1024]
    assert len(np.unique(lap)) == 1024 and np.array_equal(t.addrs[1024:], lap)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_trace_record_shows_the_program_and_exits_with_its_status(tmp_path):
    out = tmp_path / "sh.xdin.zst"
    p = cm("trace", "record", "-o", str(out), "--", "sh", "-c", "echo visible output; exit 3", timeout=300)
    assert p.returncode == 3
    assert p.stdout.decode() == "visible output\n"
    assert "sh exited with status 3" in p.stderr.decode()
    q = cm("sim", str(out), "--level", "i:32k:64:8", "--level", "d:32k:64:8", "--json")
    assert json.loads(q.stdout)["caches"][0]["fetches"]["ifetch"] > 1000
    p = cm("trace", "record", "-o", str(out), "--", "no-such-program-here")
    assert p.returncode == 2 and "no-such-program-here: command not found" in p.stderr.decode()
