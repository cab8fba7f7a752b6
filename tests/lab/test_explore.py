"""Crash-state exploration on a small workload whose answer is known by hand."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemode.lab.disk import LabConfig, LabDisk
from cachemode.lab.explore import CommandChecker, ExploreError, Outcome, explore
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.record import read_log
from cachemode.modes import get_mode
from tests.conftest import run_cli

SIZE = 8192
W0 = (b"A" * 512, 0)
W2 = (b"B" * 1024, 512)  # two sectors: can tear
W3 = (b"C" * 512, 2048)  # FUA
W4 = (b"D" * 512, 4096)  # never flushed


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "w.log"
    disk = LabDisk(MemoryDisk(SIZE), "writeback", LabConfig(record=str(path)))
    disk.pwrite(*W0)
    disk.flush()
    disk.pwrite(*W2)
    disk.pwrite(*W3, fua=True)
    disk.pwrite(*W4)
    disk.close()
    return path


def has(image, write) -> bool:
    data, off = write
    return bytes(image[off : off + len(data)]) == data


def run(log_path, mode, checker, states=2000, sector=512):
    return explore(
        read_log(log_path),
        get_mode(mode),
        base_bytes=bytes(SIZE),
        checker=checker,
        states=states,
        seed=0,
        sector=sector,
    )


def durable_present(image, state) -> Outcome:
    # What the contract promises at this crash point: W0 once the flush completed, W3 once it completed.
    ok = (state.crash_point < 2 or has(image, W0)) and (state.crash_point < 4 or has(image, W3))
    return Outcome(ok, "" if ok else "durable write missing")


@pytest.mark.parametrize(
    "mode, unique",
    [
        # crash after W0 (W0 or not: 2), after the flush with W2 whole, torn either way or absent (3 new),
        # after W3 with W2 in 4 shapes x W4 in or out (8): 13
        ("writeback", 13),
        ("none", 13),
        # every write a barrier: the 5 distinct prefixes
        ("writethrough", 5),
        ("directsync", 5),
        # no barrier: W0 x W2 (4 shapes) x W3 x W4 = 32
        ("unsafe", 32),
    ],
)
def test_state_counts_known_by_hand(log_path, mode, unique):
    report = run(log_path, mode, lambda image, state: Outcome(True))
    assert report.checked == unique
    assert report.generated == report.checked + report.duplicates


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough", "directsync"])
def test_every_generated_state_keeps_the_durable_writes(log_path, mode):
    report = run(log_path, mode, durable_present)
    assert report.failed == 0 and report.checked > 0


def test_unsafe_states_lose_durable_writes(log_path):
    report = run(log_path, "unsafe", durable_present)
    assert report.failed > 0


def test_a_checker_that_wants_unflushed_data_fails_where_it_is_missing(log_path):
    report = run(log_path, "writeback", lambda image, state: Outcome(has(image, W4), "W4 missing"))
    # W4 is present only in the 4 crash-after-W3 states that kept it
    assert (report.passed, report.failed) == (4, 9)
    assert report.failures[0]["output"] == "W4 missing"


def test_torn_states_only_at_sector_granularity(log_path):
    seen = []

    def record(image, state):
        seen.append(bytes(image[512:1536]))
        return Outcome(True)

    run(log_path, "unsafe", record, sector=4096)
    # with 4096-byte sectors W2 lies in one sector: whole or absent
    assert set(seen) == {bytes(1024), b"B" * 1024}


def test_command_checker_on_files_with_jobs_and_a_scribbling_checker(log_path, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    script = tmp_path / "check.py"
    script.write_text(
        "import sys\n"
        "p = sys.argv[1]\n"
        "d = open(p, 'rb').read()\n"
        "ok = d[2048:2560] == b'C' * 512\n"
        "open(p, 'r+b').write(b'Z' * 4096)  # a checker that repairs/scribbles must not leak into later states\n"
        "sys.exit(0 if ok else 1)\n"
    )
    checker = CommandChecker(f"{sys.executable} {script} {{image}}")
    report = explore(
        read_log(log_path), get_mode("writeback"), base=str(base), command=checker, states=2000, seed=0, jobs=2
    )
    # W3 is present in the 8 crash-after-W3 states and in none of the 5 before it
    assert (report.checked, report.passed, report.failed) == (13, 8, 5)
    assert base.read_bytes() == bytes(SIZE)


def test_cli_explore_reports_json_and_exit_status(log_path, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    out = tmp_path / "r.json"
    proc = run_cli(
        "crash",
        "explore",
        str(log_path),
        "--base",
        str(base),
        "--cache",
        "writethrough",
        "--check",
        f"cmp -s -n 512 {{image}} {base}",
        "--json",
        str(out),
    )
    # cmp against the zero base passes only for the empty prefix
    assert proc.returncode == 1, proc.stderr
    data = json.loads(out.read_text())
    assert data["states"]["checked"] == 5 and data["states"]["failed"] == 4 and data["seed"] == 0
    assert data["failures"][0]["state"]["kind"] == "prefix"
    proc = run_cli("crash", "explore", str(log_path), "--base", str(base), "--check", "true {image}")
    assert proc.returncode == 0, proc.stderr
    assert "states checked" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--check", "no-such-checker-xyz {image}"], "checker 'no-such-checker-xyz' not found"),
        (["--check", "true"], "must contain {image}"),
        (["--check", "true {image}", "--base", "WRONG"], "base image is 100 bytes"),
        (["--check", "true {image}", "--base", "MISSING"], "no such base image"),
        (["--check", "true {image}", "--log", "GARBLED"], "not a cachemode write log"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(log_path, tmp_path, args, message):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    wrong = tmp_path / "wrong.img"
    wrong.write_bytes(bytes(100))
    garbled = tmp_path / "garbled.log"
    garbled.write_bytes(b"hello world")
    log = str(log_path)
    argv = ["--base", str(base)]
    for i, a in enumerate(args):
        if a == "WRONG":
            args[i] = str(wrong)
        elif a == "MISSING":
            args[i] = str(tmp_path / "missing.img")
        elif a == "GARBLED":
            log = str(garbled)
    if "--log" in args:
        i = args.index("--log")
        del args[i : i + 2]
    if "--base" in args:
        argv = []
    proc = run_cli("crash", "explore", log, *argv, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bad_options_in_the_api(log_path):
    with pytest.raises(ExploreError, match="sector"):
        run(log_path, "writeback", lambda i, s: Outcome(True), sector=1000)


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 4000), st.integers(1, 1500), st.integers(0, 255), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    choose=st.lists(st.booleans(), min_size=12, max_size=12),
    sector=st.sampled_from([512, 4096]),
)
def test_overlay_equals_applying_the_writes_in_order(writes, choose, sector):
    from cachemode.lab.explore import CrashState
    from cachemode.lab.record import WRITE, ZERO, LogEntry, WriteLog
    from cachemode.lab.states import StateBuilder

    size = 6000
    base = bytes((i * 7) & 0xFF for i in range(size))
    entries = []
    for i, (off, length, byte, is_zero) in enumerate(writes):
        length = min(length, size - off)
        if is_zero:
            entries.append(LogEntry(i, ZERO, off, length))
        else:
            entries.append(LogEntry(i, WRITE, off, length, data=bytes([byte]) * length))
    log = WriteLog(size, entries)
    chosen = [i for i in range(len(entries)) if choose[i]]
    kept = tuple(i for i in chosen if i % 3)
    # every third chosen write is torn: only its even-numbered sectors land
    torn = {
        i: {s_ for s_ in range(entries[i].offset // sector, size // sector + 1) if s_ % 2 == 0}
        for i in chosen
        if i % 3 == 0
    }
    state = CrashState(len(entries), "torn", (), kept, tuple((i, tuple(sorted(v))) for i, v in torn.items()))
    builder = StateBuilder(log, sector, lambda n, o: base[o : o + n])
    ov = builder.build(state.durable, state.kept, state.torn)
    got = bytearray(base)
    for s_, buf in ov.sectors(builder.pool, size).items():
        got[s_ * sector : s_ * sector + len(buf)] = buf
    want = bytearray(base)
    for i in chosen:
        e = entries[i]
        data = e.data if e.kind == WRITE else bytes(e.length)
        end = e.offset + e.length
        for s_ in range(e.offset // sector, (end + sector - 1) // sector):
            if i not in torn or s_ in torn[i]:
                lo, hi = max(e.offset, s_ * sector), min(end, (s_ + 1) * sector)
                want[lo:hi] = data[lo - e.offset : hi - e.offset]
    assert got == want


def test_overlay_image_reads_the_state_and_copies_on_write():
    from cachemode.lab.explore import OverlayImage

    base = bytes(range(256)) * 16  # 4096 bytes
    img = OverlayImage(base, {1: b"\xaa" * 512}, 512)
    assert img[500:520] == base[500:512] + b"\xaa" * 8
    assert img.pread(4096, 0) == base[:512] + b"\xaa" * 512 + base[1024:]
    img.pwrite(b"\x01" * 10, 1020)  # spans sectors 1 and 2
    assert img[1016:1034] == b"\xaa" * 4 + b"\x01" * 10 + base[1030:1034]
    assert base == bytes(range(256)) * 16 and set(img.sectors) == {1, 2}


def test_cli_write_cache_off_makes_every_write_a_barrier(log_path, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    counts = {}
    for wc in ("on", "off"):
        proc = run_cli(
            "crash",
            "explore",
            str(log_path),
            "--base",
            str(base),
            "--cache",
            "writeback",
            "--write-cache",
            wc,
            "--check",
            "true {image}",
            "--states",
            "2000",
            "--json",
            "-",
        )
        assert proc.returncode == 0, proc.stderr
        counts[wc] = json.loads(proc.stdout)["states"]["checked"]
    assert counts == {"on": 13, "off": 5}  # off: the 5 prefixes, as in writethrough
