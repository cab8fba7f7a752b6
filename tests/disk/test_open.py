"""Opening images: the flags really set on the descriptor, alignment probing, and every open error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cachemode.disk import ImageOpenError, RangeError, ReadOnlyError, open_disk
from cachemode.disk.alignment import AlignmentLayer
from cachemode.disk.image import fd_flags, flag_names
from cachemode.modes import MODES
from tests.conftest import run_cli


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_fdinfo_flags_per_mode(image: Path, mode) -> None:
    with open_disk(image, mode.name) as disk:
        flags = fd_flags(disk.image.fd)
        assert bool(flags & os.O_DIRECT) == mode.direct
        assert bool(flags & os.O_DSYNC) == (not mode.writeback)
        assert flag_names(flags) == list(mode.open_flags)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert disk.guest_write_cache == mode.writeback
        has_alignment_layer = any(isinstance(layer, AlignmentLayer) for layer in disk.layers())
        assert has_alignment_layer == mode.direct


def test_alignment_probe_on_allocated_file(image: Path) -> None:
    # The file's first block is real data on a block device of logical block size 512 or 4096.
    with open_disk(image, "none") as disk:
        assert disk.alignment in (512, 1024, 2048, 4096)
    with open_disk(image, "writeback") as disk:
        assert disk.alignment == 1


def test_alignment_probe_on_hole_falls_back_to_4096(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 20)
    with open_disk(sparse, "none") as disk:
        assert disk.alignment == max(4096, os.sysconf("SC_PAGE_SIZE"))


def test_unaligned_image_size_refused_under_odirect(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(os.urandom(4096 * 4 + 100))
    with pytest.raises(ImageOpenError, match="not a multiple of the O_DIRECT request alignment"):
        open_disk(odd, "none")
    with open_disk(odd, "writeback") as disk:  # buffered I/O has no such constraint
        assert disk.size == 4096 * 4 + 100


@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_filesystem_without_odirect(no_odirect_dir: Path, mode: str) -> None:
    img = no_odirect_dir / "disk.img"
    img.write_bytes(bytes(65536))
    with pytest.raises(ImageOpenError) as err:
        open_disk(img, mode)
    message = str(err.value)
    assert str(img) in message and "does not support O_DIRECT" in message and "--cache writeback" in message
    result = run_cli("disk", "info", str(img), "--cache", mode)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not support O_DIRECT" in result.stderr


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageOpenError, match="no such image"):
        open_disk(tmp_path / "missing.img")
    with pytest.raises(ImageOpenError, match="is a directory"):
        open_disk(tmp_path)
    result = run_cli("disk", "info", str(tmp_path / "missing.img"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such image (use --create SIZE to create it)" in result.stderr


def test_immutable_file_cannot_be_opened_for_write(image: Path) -> None:
    # Root ignores permission bits, so use the immutable attribute, which binds root too.
    if subprocess.run(["chattr", "+i", str(image)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(ImageOpenError, match=r"permission denied.*--read-only"):
            open_disk(image)
        with open_disk(image, read_only=True) as disk:
            assert disk.pread(4, 0) == image.read_bytes()[:4]
    finally:
        subprocess.run(["chattr", "-i", str(image)], check=True)


def test_read_only_disk_refuses_writes(image: Path) -> None:
    before = image.read_bytes()
    with open_disk(image, "writeback", read_only=True) as disk:
        assert fd_flags(disk.image.fd) & os.O_ACCMODE == os.O_RDONLY
        for call in (
            lambda: disk.pwrite(b"x", 0),
            lambda: disk.trim(0, 4096),
            lambda: disk.zero(0, 4096),
        ):
            with pytest.raises(ReadOnlyError):
                call()
    assert image.read_bytes() == before


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_out_of_range_and_negative(image: Path, mode: str) -> None:
    before = image.read_bytes()
    with open_disk(image, mode) as disk:
        size = disk.size
        with pytest.raises(RangeError, match="beyond the end"):
            disk.pread(2, size - 1)
        with pytest.raises(RangeError, match="beyond the end"):
            disk.pwrite(b"ab", size - 1)
        with pytest.raises(RangeError, match="negative"):
            disk.pread(-1, 0)
        with pytest.raises(RangeError, match="negative"):
            disk.zero(-4096, 4096)
        with pytest.raises(RangeError):
            disk.trim(size, 1)
        assert disk.pread(0, size) == b""
    assert image.read_bytes() == before


def test_create_image(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    with open_disk(path, create_size=8 << 20) as disk:
        assert disk.size == 8 << 20
    assert os.stat(path).st_blocks == 0  # sparse
    with pytest.raises(ImageOpenError, match="exists with size"):
        open_disk(path, create_size=4 << 20)
