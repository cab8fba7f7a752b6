"""Dinero IV compatibility: option parsing, report layout, and numbers recorded from Dinero IV itself.

Expected numbers labelled "Dinero IV" were printed by dineroIV (release 7, d4-7, built from the authors'
tarball) for the command shown; the trace is generated here by ``lcg_trace``. The mm32 figures are the public
ones from Dinero's ``testing/`` directory (../shared/reference/cpu-cache-semantics.md, section 9).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cachemode.cpu import CacheConfig, simulate
from cachemode.cpu.dinero import DineroError, main_text, parse_args
from cachemode.cpu.trace import parse_bytes

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MM32 = SHARED / "traces" / "mm32.din"
needs_mm32 = pytest.mark.skipif(not MM32.exists(), reason=f"shared trace {MM32} not present (../shared is missing)")


def argv(line: str) -> list[str]:
    return line.split()


def lcg_trace(n: int = 4000, seed: int = 12345) -> str:
    """Deterministic extended-din trace: mixed types, unaligned and block-spanning sizes."""
    x = seed
    out = []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        r = x >> 33
        kind = "rrrwwim"[r % 7]
        addr = 0x1000 + (r >> 3) % 3000
        size = (1, 2, 4, 4, 8, 8, 16, 24, 40)[(r >> 20) % 9]
        out.append(f"{kind} {addr:x} {size:x}\n")
    return "".join(out)


def report_rows(text: str) -> dict[str, dict[str, list[float]]]:
    """{cache name: {row label: numbers}} from a Dinero-style report."""
    caches: dict[str, dict[str, list[float]]] = {}
    cur = None
    for line in text.splitlines():
        if re.fullmatch(r"l\d-\S+", line):
            cur = caches.setdefault(line, {})
        elif cur is not None and line.startswith(" ") and not line.startswith(" Metrics"):
            m = re.match(r"\s*([A-Za-z(][A-Za-z /()-]*?)\s*\t?\s*([-\d.\s\t]+)$", line)
            if m:
                cur[m.group(1).strip()] = [float(v) for v in m.group(2).split()]
    return caches


# Dinero IV, on lcg_trace() as extended din: dineroIV <options> -informat D < lcg.xdin
LCG_EXPECTED = {
    "-l1-usize 1k -l1-ubsize 16 -l1-uassoc 2 -l1-uccc": {
        "l1-ucache": {
            "Demand Fetches": [6866, 919, 5947, 2862, 2085, 1000],
            "Demand Misses": [4627, 620, 4007, 1951, 1412, 644],
            "Compulsory misses": [190, 25, 165, 81, 61, 23],
            "Capacity misses": [3888, 517, 3371, 1634, 1183, 554],
            "Conflict misses": [549, 78, 471, 236, 168, 67],
            "Multi-block refs": [2866],
            "Bytes From Memory": [70304],
            "Bytes To Memory": [29024],
        }
    },
    "-l1-usize 1k -l1-ubsize 16 -l1-uassoc 2 -l1-urepl f -l1-uwalloc n -l1-uwback n": {
        "l1-ucache": {
            "Demand Fetches": [6866, 919, 5947, 2862, 2085, 1000],
            "Demand Misses": [4615, 617, 3998, 1928, 1401, 669],
            "Multi-block refs": [2866],
            "Bytes From Memory": [51424],
            "Bytes To Memory": [15137],
        }
    },
    "-l1-isize 512 -l1-ibsize 16 -l1-dsize 1k -l1-dbsize 32 -l1-dassoc 4 -l1-dwalloc f "
    "-l2-usize 4k -l2-ubsize 64 -l2-uassoc 4 -l2-uwback n -l2-uccc": {
        "l1-icache": {
            "Demand Fetches": [919, 919, 0, 0, 0, 0],
            "Demand Misses": [780, 780, 0, 0, 0, 0],
            "Multi-block refs": [356],
            "Bytes From Memory": [12480],
            "Bytes To Memory": [0],
        },
        "l1-dcache": {
            "Demand Fetches": [4695, 0, 4695, 2274, 1639, 782],
            "Demand Misses": [3123, 0, 3123, 1496, 1121, 506],
            "Multi-block refs": [1258],
            "Bytes From Memory": [64064],
            "Bytes To Memory": [23660],
        },
        "l2-ucache": {
            "Demand Fetches": [4311, 780, 3531, 1496, 1529, 506],
            "Demand Misses": [48, 5, 43, 19, 17, 7],
            "Compulsory misses": [48, 5, 43, 19, 17, 7],
            "Capacity misses": [0, 0, 0, 0, 0, 0],
            "Conflict misses": [0, 0, 0, 0, 0, 0],
            "Multi-block refs": [0],
            "Bytes From Memory": [3072],
            "Bytes To Memory": [23660],
        },
    },
    "-l1-usize 512 -l1-ubsize 16 -l1-uassoc 1 -l2-usize 2k -l2-ubsize 32 -l2-uassoc 2 -l2-urepl f "
    "-l2-uwalloc n -flushcount 1000 -maxcount 3500 -skipcount 7": {
        "l1-ucache": {
            "Demand Fetches": [5971, 799, 5172, 2494, 1819, 859],
            "Demand Misses": [5031, 674, 4357, 2093, 1551, 713],
            "Multi-block refs": [2471],
            "Bytes From Memory": [76432],
            "Bytes To Memory": [27728],
        },
        "l2-ucache": {
            "Demand Fetches": [6510, 674, 5836, 3390, 1733, 713],
            "Demand Misses": [1862, 228, 1634, 1182, 207, 245],
            "Multi-block refs": [0],
            "Bytes From Memory": [52960],
            "Bytes To Memory": [31344],
        },
    },
    # an associativity that does not divide the blocks: 1024 / (16 * 3) = 21 sets, as Dinero rounds
    "-l1-usize 1k -l1-ubsize 16 -l1-uassoc 3 -l1-uccc": {
        "l1-ucache": {
            "Demand Fetches": [6866, 919, 5947, 2862, 2085, 1000],
            "Demand Misses": [4599, 606, 3993, 1920, 1402, 671],
            "Compulsory misses": [190, 25, 165, 81, 61, 23],
            "Capacity misses": [3996, 526, 3470, 1670, 1223, 577],
            "Conflict misses": [413, 55, 358, 169, 118, 71],
            "Multi-block refs": [2866],
            "Bytes From Memory": [70000],
            "Bytes To Memory": [28976],
        }
    },
    # a data cache alone at level 1: instruction fetches go straight to the unified level 2 (5-way, 25 sets)
    "-l1-dsize 1k -l1-dbsize 16 -l1-dassoc 2 -l2-usize 4k -l2-ubsize 32 -l2-uassoc 5": {
        "l1-dcache": {
            "Demand Fetches": [5947, 0, 5947, 2862, 2085, 1000],
            "Demand Misses": [3961, 0, 3961, 1903, 1422, 636],
            "Multi-block refs": [2510],
            "Bytes From Memory": [59552],
            "Bytes To Memory": [28368],
        },
        "l2-ucache": {
            "Demand Fetches": [6240, 745, 5495, 3086, 1773, 636],
            "Demand Misses": [95, 11, 84, 70, 0, 14],
            "Multi-block refs": [182],
            "Bytes From Memory": [3040],
            "Bytes To Memory": [3040],
        },
    },
}


@pytest.mark.parametrize("options", list(LCG_EXPECTED))
def test_matches_numbers_printed_by_dinero_iv(options):
    text, warnings = main_text([*options.split(), "-informat", "D"], lcg_trace().encode())
    assert warnings == []
    got = report_rows(text)
    for cache, rows in LCG_EXPECTED[options].items():
        for label, values in rows.items():
            assert got[cache][label] == values, (cache, label)
    assert ("---Maximum address count exceeded." in text) == ("-maxcount" in options)


# Dinero IV, testing/mm.32.good.u8b16a4 (report part, produced by
# dineroIV -l1-usize 8k -l1-ubsize 16 -l1-uassoc 4 -l1-urepl l -l1-ufetch d -l1-uwalloc a -l1-uwback a -informat d)
MM32_REPORT = (
    "---Simulation complete.\n"
    "l1-ucache\n"
    " Metrics\t\t      Total\t      Instrn\t       Data\t       Read\t      Write\t       Misc\n"
    " -----------------\t      ------\t      ------\t      ------\t      ------\t      ------\t      ------\n"
    " Demand Fetches\t\t      265775\t      188971\t       76804\t       70370\t        6426\t           8\n"
    "  Fraction of total\t      1.0000\t      0.7110\t      0.2890\t      0.2648\t      0.0242\t      0.0000\n"
    "\n"
    " Demand Misses\t\t       20248\t         620\t       19628\t       18525\t        1103\t           0\n"
    "  Demand miss rate\t      0.0762\t      0.0033\t      0.2556\t      0.2633\t      0.1716\t      0.0000\n"
    "\n"
    " Multi-block refs                 0\n"
    " Bytes From Memory\t      323968\n"
    " ( / Demand Fetches)\t      1.2190\n"
    " Bytes To Memory\t       49792\n"
    " ( / Demand Writes)\t      7.7485\n"
    " Total Bytes r/w Mem\t      373760\n"
    " ( / Demand Fetches)\t      1.4063\n"
    "\n"
    "---Execution complete.\n"
)

# cpu-cache-semantics.md section 9: walloc, wback -> misses (read, write, ifetch), bytes from, bytes to
MM32_TABLE = [
    ("a", "a", 20248, (18525, 1103, 620), 323968, 49792),
    ("a", "n", 20248, (18525, 1103, 620), 323968, 25704),
    ("n", "a", 22445, (18593, 3232, 620), 307408, 45760),
    ("n", "n", 22445, (18593, 3232, 620), 307408, 25704),
]


@pytest.fixture(scope="module")
def mm32():
    return parse_bytes(MM32.read_bytes(), "din", str(MM32)) if MM32.exists() else None


@needs_mm32
@pytest.mark.parametrize(("walloc", "wback", "misses", "split", "bfrom", "bto"), MM32_TABLE)
def test_mm32_table_python_api(mm32, walloc, wback, misses, split, bfrom, bto):
    assert len(mm32) == 265775
    c = simulate(CacheConfig("8k", 16, 4, repl="lru", walloc=walloc, wback=wback), mm32).caches[0]
    assert c.total_misses == misses
    assert (c.misses["read"], c.misses["write"], c.misses["ifetch"]) == split
    assert (c.bytes_read, c.bytes_written) == (bfrom, bto)


@needs_mm32
@pytest.mark.parametrize(("walloc", "wback", "misses", "split", "bfrom", "bto"), MM32_TABLE)
def test_mm32_table_dinero_cli(walloc, wback, misses, split, bfrom, bto):
    args = argv("-l1-usize 8k -l1-ubsize 16 -l1-uassoc 4 -l1-urepl l -l1-ufetch d")
    args += ["-l1-uwalloc", walloc, "-l1-uwback", wback, "-informat", "d"]
    with MM32.open("rb") as f:
        p = subprocess.run([sys.executable, "-m", "cachemode", "dinero", *args], stdin=f, capture_output=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    rows = report_rows(out)["l1-ucache"]
    assert rows["Demand Misses"] == [misses, split[2], misses - split[2], split[0], split[1], 0]
    assert rows["Bytes From Memory"] == [bfrom] and rows["Bytes To Memory"] == [bto]
    if (walloc, wback) == ("a", "a"):
        assert out.endswith(MM32_REPORT)
        assert out.startswith("---cachemode dinero: a Dinero IV (version 7) compatible cache simulator\n")
        assert "\n-l1-usize 8192\n-l1-ubsize 16\n-l1-usbsize 16\n-l1-uassoc 4\n-l1-urepl l\n" in out


def test_summary_of_options_order_and_defaults():
    text, _ = main_text(
        argv(
            "-l1-isize 1k -l1-ibsize 16 -l1-dsize 1k -l1-dbsize 16 -l1-dccc -l2-usize 4k -l2-ubsize 32 -l2-uwback n "
            "-informat d"
        ),
        b"0 10\n",
    )
    summary = text.split("---Summary of options (-help option gives usage information).\n\n")[1].split("\n\n")[0]
    # Dinero IV prints each option for the u caches of every level, then i, then d
    assert summary.splitlines() == [
        "-l2-usize 4096", "-l1-isize 1024", "-l1-dsize 1024",
        "-l2-ubsize 32", "-l1-ibsize 16", "-l1-dbsize 16",
        "-l2-usbsize 32", "-l1-isbsize 16", "-l1-dsbsize 16",
        "-l2-uassoc 1", "-l1-iassoc 1", "-l1-dassoc 1",
        "-l2-urepl l", "-l1-irepl l", "-l1-drepl l",
        "-l2-ufetch d", "-l1-ifetch d", "-l1-dfetch d",
        "-l2-uwalloc a", "-l1-dwalloc a",
        "-l2-uwback n", "-l1-dwback a",
        "-l1-dccc",
        "-skipcount 0", "-flushcount 0", "-maxcount 0", "-stat-interval 0", "-informat d",
        "-on-trigger 0x0", "-off-trigger 0x0",
    ]  # fmt: skip


def test_stat_idcombine_adds_i_and_d():
    opts = argv("-l1-isize 512 -l1-ibsize 16 -l1-dsize 1k -l1-dbsize 16 -stat-idcombine -informat D")
    rows = report_rows(main_text(opts, lcg_trace(500).encode())[0])
    assert list(rows) == ["l1-I/Dcaches"]
    sep = report_rows(main_text([*opts[:-3], "-informat", "D"], lcg_trace(500).encode())[0])
    total = [a + b for a, b in zip(sep["l1-icache"]["Demand Misses"], sep["l1-dcache"]["Demand Misses"], strict=True)]
    assert rows["l1-I/Dcaches"]["Demand Misses"] == total


def test_stat_interval_prints_running_totals():
    # Dinero IV: dineroIV -l1-usize 1k -l1-ubsize 16 -stat-interval 1500 -informat D < lcg.xdin
    text, _ = main_text(argv("-l1-usize 1k -l1-ubsize 16 -stat-interval 1500 -informat D"), lcg_trace().encode())
    begins, rest = text.split("---Simulation begins.\n")[1].split("---Simulation complete.\n")
    fetches = [line.split()[2] for line in begins.splitlines() if line.startswith(" Demand Fetches")]
    assert fetches == ["2570", "5112"]
    assert report_rows(rest)["l1-ucache"]["Demand Fetches"][0] == 6866


def test_triggers_and_skipcount_warning():
    data = b"r 10 4\nr 20 4\nr 30 4\nr 40 4\nr 50 4\n"
    text, warnings = main_text(argv("-l1-usize 1k -l1-ubsize 16 -on-trigger 20 -off-trigger 40"), data)
    assert report_rows(text)["l1-ucache"]["Demand Fetches"][0] == 1  # only 0x30 between the triggers
    assert warnings == []
    _, warnings = main_text(argv("-l1-usize 1k -l1-ubsize 16 -skipcount 9"), data)
    assert warnings == ["input ended before -skipcount satisfied"]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("", "cache size and block size must be specified"),
        ("-l1-usize 1k", "level 1 ucache block size must be specified, e.g., -l1-ubsize 16"),
        ("-l1-ubsize 16", "level 1 ucache size must be specified"),
        ("-l1-usize 1000 -l1-ubsize 16", '"-l1-usize" option argument "1000" must be a power of 2'),
        ("-l1-usize 1k -l1-ubsize 16 -l1-urepl x", "level 1 ucache replacement policy unrecognized"),
        ("-l1-usize 1k -l1-ubsize 16 -l1-ufetch a", "prefetch policy 'a' is not supported"),
        ("-l1-usize 1k -l1-ubsize 16 -l1-usbsize 4", "sub-blocks are not supported"),
        ("-l1-usize 1k -l1-ubsize 16 -informat p", "pixie traces) is not supported"),
        ("-l1-usize 1k -l1-ubsize 16 -informat q", "unknown input format 'q'"),
        ("-l1-usize 1k -l1-ubsize 16 -bogus", '"-bogus" option not recognized'),
        ("-l1-usize 1k -l1-ubsize 16 -u 8", "Dinero III options are not accepted"),
        ("-l1-usize", '"-l1-usize" option requires additional argument'),
        ("-l6-usize 1k -l6-ubsize 16", "levels are 1-5"),
        ("-l1-usize 1k -l1-ubsize 16 -l1-isize 1k -l1-ibsize 16", "level 1 has i or d together with u"),
        ("-l1-isize 1k -l1-ibsize 16 -l1-iwalloc a", "level 1 icache cannot have write allocate policy"),
        ("-l1-usize 1k -l1-ubsize 16 -custom x", '"-custom" is not supported'),
    ],
)
def test_option_errors(line, fragment):
    with pytest.raises(DineroError) as exc:
        parse_args(argv(line))
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)
