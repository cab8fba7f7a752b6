"""A real block device (a loop device with 4 KiB logical sectors) as the image."""

from __future__ import annotations

import os

from cachemode.disk import open_disk


def test_block_device_size_alignment_and_io(loop_device: str) -> None:
    with open_disk(loop_device, "none") as disk:
        assert disk.image.is_block_device
        assert disk.size == 16 << 20
        assert disk.alignment == 4096  # BLKSSZGET, not a trial read
        data = os.urandom(10000)
        disk.pwrite(data, 12345, fua=True)
        assert disk.pread(10000, 12345) == data
        disk.zero(8192, 4096)
        assert disk.pread(4096, 8192) == bytes(4096)
        disk.trim(1 << 20, 1 << 20)  # BLKDISCARD through fallocate(PUNCH_HOLE) on the loop device
        assert disk.pread(4096, 1 << 20) == bytes(4096)
        assert [e.flags for e in disk.block_status(0, disk.size)] == [0]
    with open_disk(loop_device, "writeback", read_only=True) as disk:
        assert disk.pread(10000, 12345) == data
