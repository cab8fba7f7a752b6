"""Image locks that QEMU honours, and that honour QEMU's: two writers never share an image by accident."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cachemode.disk import ImageOpenError, open_disk


def test_second_writer_and_reader_are_refused(image: Path) -> None:
    with open_disk(image, "writeback"):
        with pytest.raises(ImageOpenError, match="failed to get"):
            open_disk(image, "none")
        with pytest.raises(ImageOpenError, match='shared "write" lock'):
            open_disk(image, read_only=True)  # a reader does not let others write under it
        with open_disk(image, read_only=True, locking=False) as peek:  # explicitly unlocked: allowed
            assert peek.size == 1 << 20
    with open_disk(image, "none"):  # closing released the locks
        pass


def test_readers_share(image: Path) -> None:
    with (
        open_disk(image, read_only=True),
        open_disk(image, read_only=True),
        pytest.raises(ImageOpenError, match="failed to get"),
    ):
        open_disk(image)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed (Debian: qemu-utils)")
def test_qemu_respects_our_locks_and_we_respect_qemus(image: Path) -> None:
    qemu_io = ["qemu-io", "-f", "raw"]
    with open_disk(image):
        busy = subprocess.run([*qemu_io, "-c", "read 0 512", str(image)], capture_output=True, text=True)
        assert busy.returncode != 0 and "lock" in busy.stderr, busy.stderr
        shared = subprocess.run([*qemu_io, "-r", "-U", "-c", "read 0 512", str(image)], capture_output=True, text=True)
        assert shared.returncode == 0, shared.stderr  # -U (force share) is QEMU's own way around the lock
    free = subprocess.run([*qemu_io, "-c", "read 0 512", str(image)], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd is not installed (Debian: qemu-utils)")
def test_image_served_by_qemu_nbd_is_refused(image: Path, tmp_path: Path) -> None:
    sock = tmp_path / "qemu-nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock), str(image)], stderr=subprocess.PIPE)
    try:
        # Wait until it serves (qemu-nbd -L lists the export), not merely until the socket exists: the
        # listening socket may appear before the image is opened and locked.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listing = subprocess.run(["qemu-nbd", "-L", "-k", str(sock)], capture_output=True, text=True)
            if listing.returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"qemu-nbd did not start serving: {listing.stderr}")
        with pytest.raises(ImageOpenError, match="another process"):
            open_disk(image)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with open_disk(image):
        pass
