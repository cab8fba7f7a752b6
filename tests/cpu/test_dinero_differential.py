"""`cachemode dinero` against a real dineroIV on random configurations and traces, report for report.

Runs only where DINEROIV names a dineroIV binary (built from Dinero IV's public source, outside this repository:
its licence allows no redistribution). Everything random is seeded, so a failure names a reproducible case.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from cachemode.cpu.dinero import main_text

DINEROIV = os.environ.get("DINEROIV", "")
pytestmark = pytest.mark.skipif(not os.access(DINEROIV, os.X_OK), reason="set DINEROIV=/path/to/dineroIV to run")


def random_trace(rng: np.random.Generator, fmt: str) -> bytes:
    n = int(rng.integers(100, 6000))
    types = rng.choice(4, n, p=[0.5, 0.25, 0.2, 0.05])
    addrs = rng.choice([0x1000, 0x40000, 0x7FF000], n) + rng.integers(0, int(rng.choice([512, 4096, 65536])), n)
    if fmt == "d":
        return "".join(f"{t} {a:x}\n" for t, a in zip(types, addrs, strict=True)).encode()
    sizes = rng.choice([1, 2, 4, 8, 16, 64], n)
    lines = []
    for t, a, s in zip(types, addrs, sizes, strict=True):
        if rng.random() < 0.01:  # copy-back or invalidate, of one block or of everything
            lines.append(f"{'cv'[rng.integers(2)]} {a:x} {0 if rng.random() < 0.3 else 4:x}\n")
        lines.append(f"{'rwim'[t]} {a:x} {s:x}\n")
    return "".join(lines).encode()


def random_options(rng: np.random.Generator) -> list[str]:
    args: list[str] = []
    block = 8
    for lev in range(1, int(rng.integers(1, 4)) + 1):
        block *= int(rng.choice([1, 2, 4]))
        if lev > 1 or rng.random() < 0.4:
            kinds = ["u"]
        else:
            kinds = ["i", "d"] if rng.random() < 0.7 else [str(rng.choice(["i", "d"]))]
        for k in kinds:
            blocks = 2 ** int(rng.integers(3, 9)) * lev
            size = 1 << (blocks * block - 1).bit_length()  # a power of 2
            assoc = int(rng.choice([1, 2, 3, 4, 5, 8, 16, size // block]))
            args += [f"-l{lev}-{k}size", str(size), f"-l{lev}-{k}bsize", str(block), f"-l{lev}-{k}assoc", str(assoc)]
            args += [f"-l{lev}-{k}repl", str(rng.choice(["l", "f"]))]
            if k != "i":
                walloc, wback = rng.choice(list("anf"), 2)
                args += [f"-l{lev}-{k}walloc", str(walloc), f"-l{lev}-{k}wback", str(wback)]
            if rng.random() < 0.3:
                args.append(f"-l{lev}-{k}ccc")
    for opt, lo, hi in (("-flushcount", 100, 3000), ("-skipcount", 1, 500), ("-maxcount", 1000, 6000),
                        ("-stat-interval", 500, 3000)):  # fmt: skip
        if rng.random() < 0.2:
            args += [opt, str(int(rng.integers(lo, hi)))]
    return args


def report(text: str) -> str:
    return text[text.index("---Summary of options") :]  # the banner differs on purpose


@pytest.mark.parametrize("seed", range(40))
def test_same_report_as_dinero_iv(seed):
    rng = np.random.default_rng(seed)
    fmt = str(rng.choice(["d", "D"]))
    data = random_trace(rng, fmt)
    args = [*random_options(rng), "-informat", fmt]
    ref = subprocess.run([DINEROIV, *args], input=data, capture_output=True, timeout=60)
    if ref.returncode != 0:
        pytest.skip(f"dineroIV refuses {' '.join(args)}")
    mine, _ = main_text(args, data)
    assert report(mine) == report(ref.stdout.decode()), " ".join(args)
