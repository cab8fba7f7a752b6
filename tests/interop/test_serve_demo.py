"""``cachemode demo`` (what ``make demo`` runs): serves the demo image and shows a verified client session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nbd.serving import ROOT

pytestmark = pytest.mark.interop


def test_demo_serves_and_shows_a_verified_session(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path), COLUMNS="120")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachemode", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "until Ctrl-C" in line:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    text = "".join(lines)
    assert lines and lines[0].startswith("cachemode serve: nbd://127.0.0.1:"), text + err
    assert "cache=writeback" in lines[0]
    assert "verified" in text and "FLUSH: ok" in text, text + err
    assert "writethrough" in text  # the mode table
    assert proc.returncode == 0, err
    image = tmp_path / "data" / "cachemode" / "demo.img"
    assert image.stat().st_size == 1 << 30
    assert image.stat().st_blocks * 512 < 64 << 20  # sparse
