"""nbdinfo against ``cachemode serve``: what each mode tells the client, and the allocation map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.nbd.serving import MIB, need, run, served

pytestmark = pytest.mark.interop

# mode -> write cache the guest sees with --write-cache on (SEND_FLUSH and SEND_FUA advertised)
EXPECTED = {"writeback": True, "none": True, "unsafe": True, "writethrough": False, "directsync": False}


@pytest.mark.parametrize("write_cache", [True, False], ids=["wc-on", "wc-off"])
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_nbdinfo_flags_per_mode(tmp_path: Path, mode: str, write_cache: bool) -> None:
    need("nbdinfo")
    with served(tmp_path / "disk.img", mode, write_cache=write_cache, export_name="disk") as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    export = info["exports"][0]
    told = EXPECTED[mode] and write_cache
    assert info["structured"] is True
    assert export["export-name"] == "disk"
    assert export["can_flush"] is told
    assert export["can_fua"] is told
    assert export["can_multi_conn"] is True
    assert export["can_df"] is True
    assert export["can_zero"] is True and export["can_trim"] is True and export["can_cache"] is True
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] >= 4096
    assert export["block_size_preferred"] % max(1, srv.disk.alignment) == 0
    assert export["block_size_maximum"] == 32 * MIB
    assert export["export-size"] == 64 * MIB
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_read_only(tmp_path: Path) -> None:
    need("nbdinfo")
    with served(tmp_path / "disk.img", read_only=True) as srv:
        export = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False and export["can_zero"] is False


def test_nbdinfo_list(tmp_path: Path) -> None:
    need("nbdinfo")
    with served(tmp_path / "disk.img", export_name="vol1") as srv:
        out = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
    names = [e["export-name"] for e in json.loads(out)["exports"]]
    assert names == ["vol1"]


def test_nbdinfo_map_matches_image(tmp_path: Path) -> None:
    need("nbdinfo")
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(2 * MIB)
        f.write(os.urandom(MIB))
        f.seek(10 * MIB)
        f.write(os.urandom(2 * MIB))
    with served(path, size=16 * MIB) as srv:
        out = run(["nbdinfo", "--map", "--json", srv.uri]).stdout
    extents = json.loads(out)
    assert sum(e["length"] for e in extents) == 16 * MIB
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    assert sum(n for _, n in data) == 3 * MIB
    assert (2 * MIB, MIB) in data and (10 * MIB, 2 * MIB) in data
