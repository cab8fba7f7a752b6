"""The mode table: its rows, what is derived from them, and the ``cachemode modes`` command."""

from __future__ import annotations

import json
import os

import pytest

from cachemode.modes import MODES, Failure, UnknownModeError, get_mode
from tests.conftest import run_cli


def test_default_and_aliases() -> None:
    assert get_mode(None).name == "writeback"
    assert get_mode("").name == "writeback"
    assert get_mode("off") is get_mode("none")
    assert get_mode("WriteThrough").name == "writethrough"
    with pytest.raises(UnknownModeError, match="unknown cache mode 'fast'"):
        get_mode("fast")


@pytest.mark.parametrize(
    ("name", "writeback", "direct", "no_flush", "flags"),
    [
        ("writeback", True, False, False, ()),
        ("none", True, True, False, ("O_DIRECT",)),
        ("writethrough", False, False, False, ("O_DSYNC",)),
        ("directsync", False, True, False, ("O_DIRECT", "O_DSYNC")),
        ("unsafe", True, False, True, ()),
    ],
)
def test_rows_match_qemu(name: str, writeback: bool, direct: bool, no_flush: bool, flags: tuple[str, ...]) -> None:
    mode = get_mode(name)
    assert (mode.writeback, mode.direct, mode.no_flush) == (writeback, direct, no_flush)
    assert mode.open_flags == flags
    expected_bits = 0
    for flag in flags:
        expected_bits |= getattr(os, flag)
    assert mode.os_flags == expected_bits


def test_guest_write_cache_switch() -> None:
    wb, none, wt, ds, unsafe = (get_mode(n) for n in ("writeback", "none", "writethrough", "directsync", "unsafe"))
    assert [m.guest_write_cache() for m in (wb, none, wt, ds, unsafe)] == [True, True, False, False, True]
    assert not any(m.guest_write_cache(False) for m in MODES)
    # Turning the cache off makes writeback and none write-through, but unsafe stays unsafe.
    assert wb.every_write_durable(False) and none.every_write_durable(False)
    assert not unsafe.every_write_durable(False)
    assert wb.survival(Failure.POWER_LOSS, write_cache=False).acked
    assert not unsafe.survival(Failure.POWER_LOSS, write_cache=False).acked


def test_safety_table() -> None:
    lost_on_power = {m.name: m.survival(Failure.POWER_LOSS) for m in MODES}
    assert {n for n, s in lost_on_power.items() if not s.acked} == {"writeback", "none", "unsafe"}
    assert {n for n, s in lost_on_power.items() if not s.flushed} == {"unsafe"}
    for mode in MODES:
        for failure in (Failure.GUEST_CRASH, Failure.PROCESS_CRASH):
            assert mode.survival(failure).acked and mode.survival(failure).flushed


def test_modes_json_cli() -> None:
    result = run_cli("modes", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == [m.name for m in MODES]
    for row in rows:
        mode = get_mode(row["name"])
        assert {"name", "writeback", "direct", "no_flush", "open_flags"} <= row.keys()
        assert row["open_flags"] == list(mode.open_flags)
        assert row["advertise_flush"] == mode.writeback
    off = json.loads(run_cli("modes", "--json", "--write-cache", "off").stdout)
    assert not any(r["advertise_flush"] for r in off)


def test_modes_table_cli() -> None:
    result = run_cli("modes")
    assert result.returncode == 0, result.stderr
    for mode in MODES:
        assert mode.name in result.stdout
    assert "DSYNC" in result.stdout and "DIRECT" in result.stdout


def test_bad_argument_is_one_line_exit_2() -> None:
    result = run_cli("modes", "--write-cache", "maybe")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "maybe" in result.stderr and "Traceback" not in result.stderr
