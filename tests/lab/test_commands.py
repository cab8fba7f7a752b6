"""The lab's command line: matrix (table, JSON, PNG), the --lab options, bad input."""

from __future__ import annotations

import json

import click
import pytest

from cachemode.cli.lab import lab_config_from_options
from cachemode.modes import Failure, get_mode
from tests.conftest import run_cli


def test_matrix_json_and_plot(tmp_path):
    png = tmp_path / "m.png"
    proc = run_cli("lab", "matrix", "--json", "-", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    cells = json.loads(proc.stdout)
    assert len(cells) == 15
    for cell in cells:
        table = get_mode(cell["mode"]).survival(Failure(cell["failure"]))
        if table.acked:
            assert cell["acked_unflushed_lost"] == 0
        if table.flushed:
            assert cell["flushed_lost"] == 0
    unsafe = next(c for c in cells if c["mode"] == "unsafe" and c["failure"] == "power_loss")
    assert unsafe["flushed_lost"] == unsafe["flushed"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matrix_table_without_device_cache():
    proc = run_cli("lab", "matrix", "--disk-cache", "0")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.strip("│ ").startswith("none"))
    assert "9/9" not in row  # none over a device without a write cache loses nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["lab", "matrix", "--disk-cache", "lots"], "invalid size"),
        (["lab", "status", "--control", "/nonexistent/ctl.sock"], "no such control socket"),
        (["lab", "power-cut", "--control", "/tmp/x.sock", "--seed", "3"], "--seed needs --survivors random"),
        (["lab", "sqlite", "--cache", "bogus"], "bogus"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lab_options_need_lab():
    with pytest.raises(click.UsageError, match="--disk-cache needs --lab"):
        lab_config_from_options(lab=False, lab_disk_cache=0)
    assert lab_config_from_options(lab=False) is None
    cfg = lab_config_from_options(lab=True, lab_disk_cache=0, lab_record="x.log")
    assert cfg.disk_cache == 0 and cfg.record == "x.log" and cfg.host_cache > 0
