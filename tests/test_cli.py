"""The command line as a user meets it: every subcommand loads, and ``cachemode disk info`` reports truly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachemode.cli import SUBCOMMANDS
from tests.conftest import run_cli


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name: str) -> None:
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_unknown_command_is_one_line_exit_2() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "frobnicate" in result.stderr


@pytest.mark.parametrize(("mode", "write_cache", "told"), [("none", "on", True), ("none", "off", False)])
def test_disk_info_json(image: Path, mode: str, write_cache: str, told: bool) -> None:
    result = run_cli("disk", "info", str(image), "--cache", mode, "--write-cache", write_cache, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["open_flags"] == ["O_DIRECT"]
    assert info["guest_write_cache"] is told and info["write_cache"] is told
    assert info["stack"][0].startswith("ModeLayer cache=none")
    assert info["stack"][-1].startswith("ImageFile")
    assert info["map"] == [{"offset": 0, "length": 1 << 20, "hole": False}]


def test_disk_info_bad_size_is_one_line(tmp_path: Path) -> None:
    result = run_cli("disk", "info", str(tmp_path / "x.img"), "--create", "12 parsecs")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "12 parsecs" in result.stderr
