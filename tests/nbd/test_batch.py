"""The C loops for runs of small READs and WRITEs (``cachemode.nbd._batch``): their replies are byte for byte
those of ``replies``, and they take no more than the budget, the arena and ``stop`` allow."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from cachemode.nbd import _batch as batch
from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd.budget import SMALL_REPLY, cost

REQUEST = struct.Struct(">IHHQQI")
SIZE = 1 << 20


def headers(reads: list[tuple[int, int, int]]) -> bytes:
    return b"".join(REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, *r) for r in reads)


@pytest.fixture
def image(tmp_path: Path) -> tuple[int, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, SIZE, 0)  # in the page cache: RWF_NOWAIT reads succeed
    yield fd, data
    os.close(fd)


def scan(reads: list[tuple[int, int, int]]) -> bytes:
    entries, pos = batch.scan_reads(headers(reads), 0, SIZE, 32 << 20, 0, 65536)
    assert pos == len(reads) * REQUEST.size
    return entries


@pytest.mark.parametrize("structured", [True, False])
def test_replies_are_those_of_the_core(image: tuple[int, bytes], structured: bool) -> None:
    fd, data = image
    reads = [(7, 4096, 4096), (1 << 40, 12345, 777), (3, SIZE - 1, 1), (9, 0, 65535)]
    arena = memoryview(bytearray(256 * 1024))
    index, at, charged, misses = batch.read_batch(fd, scan(reads), 0, 99, arena, 100, structured, 1 << 30, SMALL_REPLY)
    expected = b"".join(
        replies.read_header(structured, cookie, offset, length) + data[offset : offset + length]
        for cookie, offset, length in reads
    )
    assert (index, at, misses) == (4, 100 + len(expected), [])
    assert charged == sum(cost(c.CMD_READ, length) for _, _, length in reads)
    assert bytes(arena[100:at]) == expected


def test_it_stops_at_the_budget_the_arena_and_stop(image: tuple[int, bytes]) -> None:
    fd, data = image
    entries = scan([(i, 4096 * i, 4096) for i in range(8)])
    arena = memoryview(bytearray(64 * 1024))
    one = cost(c.CMD_READ, 4096)
    # room for two and a half requests: two are served
    assert batch.read_batch(fd, entries, 0, 8, arena, 0, False, 2 * one + one // 2, SMALL_REPLY)[:3] == (
        2,
        2 * (16 + 4096),
        2 * one,
    )
    # an arena with room for three replies after ``at``
    small = memoryview(bytearray(100 + 3 * (16 + 4096) + 10))
    index, at, charged, _ = batch.read_batch(fd, entries, 1, 8, small, 100, False, 1 << 30, SMALL_REPLY)
    assert (index, at, charged) == (4, 100 + 3 * (16 + 4096), 3 * one)
    assert bytes(small[100 + 16 : 100 + 16 + 4096]) == data[4096 : 2 * 4096]
    # stop
    assert batch.read_batch(fd, entries, 5, 6, arena, 0, False, 1 << 30, SMALL_REPLY)[:2] == (6, 16 + 4096)
    with pytest.raises(ValueError):
        batch.read_batch(fd, entries, 0, 8, arena, len(arena) + 1, False, 1 << 30, SMALL_REPLY)


def test_what_the_page_cache_cannot_serve_at_once_is_a_miss(image: tuple[int, bytes]) -> None:
    """A miss is charged and listed, nothing is written for it (a pipe: preadv2 fails, as a cold page's
    RWF_NOWAIT read does)."""
    r, w = os.pipe()
    try:
        arena = memoryview(bytearray(64 * 1024))
        index, at, charged, misses = batch.read_batch(
            r, scan([(1, 0, 4096), (2, 4096, 512)]), 0, 2, arena, 0, True, 1 << 30, SMALL_REPLY
        )
        assert (index, at, misses) == (2, 0, [0, 1]) and charged == cost(c.CMD_READ, 4096) + cost(c.CMD_READ, 512)
    finally:
        os.close(r)
        os.close(w)


def test_the_scanner_takes_only_the_fast_path_reads() -> None:
    good = headers([(1, 0, 4096)])
    for bad in (
        REQUEST.pack(c.REQUEST_MAGIC + 1, 0, c.CMD_READ, 2, 0, 4096),  # bad magic
        REQUEST.pack(c.REQUEST_MAGIC, c.CMD_FLAG_FUA, c.CMD_READ, 2, 0, 4096),  # any flag
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 2, 0, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 0, 0),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, SIZE - 4095, 4096),  # past the end
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, (1 << 64) - 4096, 4096),  # wraps around
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 0, 65536),  # not shorter than max_length
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 100, 512),  # unaligned (min block 512)
    ):
        entries, pos = batch.scan_reads(good + bad + good, 0, SIZE, 32 << 20, 511, 65536)
        assert (len(entries), pos) == (24, REQUEST.size)
    entries, pos = batch.scan_reads(good + good[:20], 0, SIZE, 32 << 20, 0, 65536)
    assert (len(entries), pos) == (24, REQUEST.size)  # an incomplete header is left for later


def writes(items: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, k, offset, len(d)) + d for k, offset, d in items)


def test_a_write_run_is_written_and_answered_as_the_core_would(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(SIZE))
    items = [(5, 4096, os.urandom(4096)), (1 << 50, 100, b"abc"), (6, SIZE - 512, os.urandom(512))]
    stream = writes(items) + REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 9, 0, 10) + b"short"
    entries, pos = batch.scan_writes(stream, 0, SIZE, 32 << 20, 0, 8192)
    assert pos == len(writes(items))  # the fourth's payload is incomplete: left to the core
    fd = os.open(path, os.O_RDWR)
    try:
        arena = memoryview(bytearray(4096))
        index, at, charged, failed = batch.write_batch(fd, entries, stream, 0, arena, 8, 1 << 30, SMALL_REPLY)
        assert (index, at, failed) == (3, 8 + 3 * 16, [])
        assert charged == sum(cost(c.CMD_WRITE, len(d)) for _, _, d in items)
        assert bytes(arena[8:at]) == b"".join(replies.simple(cookie) for cookie, _, _ in items)
        written = path.read_bytes()
        assert all(written[offset : offset + len(d)] == d for _, offset, d in items)
        # the budget and the arena stop it as they stop reads
        assert batch.write_batch(fd, entries, stream, 0, arena, 0, cost(c.CMD_WRITE, 4096), SMALL_REPLY)[:3] == (
            1,
            16,
            cost(c.CMD_WRITE, 4096),
        )
        assert batch.write_batch(fd, entries, stream, 1, arena, 4096 - 20, 1 << 30, SMALL_REPLY)[:2] == (2, 4096 - 4)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)  # a write that fails: charged, reported with its errno, no reply
    try:
        index, at, charged, failed = batch.write_batch(fd, entries, stream, 0, arena, 0, 1 << 30, SMALL_REPLY)
        assert (index, at) == (3, 0) and [i for i, _ in failed] == [0, 1, 2] and failed[0][1] == errno.EBADF
    finally:
        os.close(fd)
