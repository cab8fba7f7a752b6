"""The C loops for runs of small READs and WRITEs (``cachemode.nbd._batch``): their replies are byte for byte
those of ``replies``, and they take no more than the budget, the arena and ``stop`` allow."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cachemode.nbd import _batch as batch
from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd.budget import SMALL_REPLY, cost
from cachemode.nbd.server import EXT4_SUPER_MAGIC, filesystem_magic, map_image
from tests.interop.test_nbd_fast_paths import evict, on_filesystem

REQUEST = struct.Struct(">IHHQQI")
SIZE = 1 << 20
TMPFS_MAGIC = 0x01021994


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


def test_reads_known_to_miss_are_listed_without_a_second_probe(image: tuple[int, bytes]) -> None:
    """``known``: the leading entries a fused call already found uncached are listed as misses and charged,
    though here their pages are cached (a second probe would serve them); the entries after are probed."""
    fd, data = image
    entries = scan([(1, 0, 4096), (2, 4096, 4096), (3, 8192, 4096)])
    arena = memoryview(bytearray(64 * 1024))
    index, at, charged, misses = batch.read_batch(fd, entries, 0, 3, arena, 0, False, 1 << 30, SMALL_REPLY, 1)
    assert (index, misses, charged) == (3, [0], 3 * cost(c.CMD_READ, 4096))
    assert bytes(arena[:at]) == b"".join(
        replies.read_header(False, cookie, offset, 4096) + data[offset : offset + 4096]
        for cookie, offset in ((2, 4096), (3, 8192))
    )
    index, at, _, misses = batch.read_batch(fd, entries, 1, 3, arena, 0, False, 1 << 30, SMALL_REPLY, 1)
    assert (index, misses) == (3, [1])


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


def test_writes_to_cached_pages_are_stored_through_the_mapping(tmp_path: Path) -> None:
    """With a mapping, a WRITE whose pages are all in the page cache is copied into it, any other is pwritten.
    Seen through an fd that cannot write (pwrite fails, EBADF) beside a writable mapping of the same file:
    the cached ones succeed, the cold one and the one past the mapping's end fail."""
    path = tmp_path / "img"
    path.write_bytes(os.urandom(SIZE))
    items = [(1, 0, os.urandom(4096)), (2, 8192, os.urandom(512)), (3, 65536, os.urandom(8192)), (4, 3 * 65536, b"x")]
    items.append((5, SIZE - 4096, os.urandom(4096)))
    stream = writes(items)
    entries, _ = batch.scan_writes(stream, 0, SIZE, 32 << 20, 0, 65536)
    evict(path, 65536, 65536)  # the third WRITE's pages are cold
    rw = os.open(path, os.O_RDWR)
    ro = os.open(path, os.O_RDONLY)
    try:
        os.pread(rw, 4096, 0)  # cached
        os.pread(rw, 4096, 8192)
        os.pread(rw, 4096, 3 * 65536)
        os.pread(rw, 4096, SIZE - 4096)
        mapping = mmap.mmap(rw, SIZE - 4096)  # the last WRITE lies past its end
        arena = memoryview(bytearray(4096))
        index, at, charged, failed = batch.write_batch(ro, entries, stream, 0, arena, 0, 1 << 30, SMALL_REPLY, mapping)
        assert (index, charged) == (5, sum(cost(c.CMD_WRITE, len(d)) for _, _, d in items))
        assert failed == [(2, errno.EBADF), (4, errno.EBADF)]
        assert bytes(arena[:at]) == b"".join(replies.simple(cookie) for cookie, _, _ in items[:2] + items[3:4])
        mapping.close()
        data = path.read_bytes()
        assert all(data[offset : offset + len(d)] == d for _, offset, d in items[:2] + items[3:4])
        assert data[65536 : 65536 + 8192] != items[2][2]
        # with a writable fd the cold WRITE and the one past the mapping are pwritten: every WRITE lands
        evict(path, 65536, 65536)
        mapping = mmap.mmap(rw, SIZE - 4096)
        index, at, _, failed = batch.write_batch(rw, entries, stream, 0, arena, 0, 1 << 30, SMALL_REPLY, mapping)
        assert (index, at, failed) == (5, 5 * 16, [])
        mapping.close()
        data = path.read_bytes()
        assert all(data[offset : offset + len(d)] == d for _, offset, d in items)
    finally:
        os.close(ro)
        os.close(rw)


GUARD = """
import mmap, os, sys
from cachemode.nbd._batch import mapped_copy
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
os.ftruncate(fd, 1 << 20)
m = mmap.mmap(fd, 1 << 20)
assert mapped_copy(m, 8192, b"a" * 4096) is True and os.pread(fd, 4096, 8192) == b"a" * 4096
os.ftruncate(fd, 4096)  # the mapping now reaches past the end of the file: touching the rest is a SIGBUS
assert mapped_copy(m, 65536, b"b" * 4096) is False
assert mapped_copy(m, 0, b"c" * 100) is True and os.pread(fd, 100, 0) == b"c" * 100
assert mapped_copy(m, 65536, b"b" * 4096) is False
print("guarded", flush=True)
m[65536] = 1  # not a guarded copy: the fault reaches the handler that was there before (the default: death)
print("survived", flush=True)
"""


def test_a_copy_that_faults_is_refused_and_other_faults_still_kill(tmp_path: Path) -> None:
    """mapped_copy into a mapping whose file was truncated returns False (the process lives on, the next copy
    works); a SIGBUS anywhere else still ends the process as before. A process of its own: the last step
    kills it, and pytest's faulthandler would report the guarded faults."""
    proc = subprocess.run(
        [sys.executable, "-c", GUARD, str(tmp_path / "img")], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "guarded\n", proc.stderr
    assert proc.returncode == -signal.SIGBUS, proc.stderr
    with pytest.raises(ValueError):
        batch.mapped_copy(mmap.mmap(-1, 4096), 4000, b"x" * 100)


def test_the_image_is_mapped_only_on_ext4_and_when_not_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """map_image maps an image on ext2/3/4 (where it pays: the buffer-head walk), not one elsewhere (tmpfs in
    /dev/shm), and not with CACHEMODE_NBD_MAP=0."""
    here = tmp_path / "img"
    here.write_bytes(bytes(65536))
    fd = os.open(here, os.O_RDWR)
    try:
        mapping = map_image(fd, 65536)
        if filesystem_magic(fd) == EXT4_SUPER_MAGIC:
            assert mapping is not None and len(mapping) == 65536
            mapping.close()
            monkeypatch.setenv("CACHEMODE_NBD_MAP", "0")
            assert map_image(fd, 65536) is None
        else:
            assert mapping is None
    finally:
        os.close(fd)
    if os.path.isdir("/dev/shm") and on_filesystem(Path("/dev/shm")) == TMPFS_MAGIC:
        monkeypatch.delenv("CACHEMODE_NBD_MAP", raising=False)
        fd = os.open(f"/dev/shm/cachemode-map-test-{os.getpid()}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 65536)
            assert map_image(fd, 65536) is None
        finally:
            os.unlink(f"/dev/shm/cachemode-map-test-{os.getpid()}")
            os.close(fd)


def serve(
    src: bytes,
    fd: int,
    arena: memoryview,
    *,
    pos: int = 0,
    at: int = 0,
    structured: bool = False,
    room: int = 1 << 30,
    most: int = 99,
) -> tuple[int, int, int, bool]:
    return batch.serve_reads(
        src, pos, len(src), SIZE, 32 << 20, 0, 65536, fd, arena, at, structured, room, SMALL_REPLY, most
    )


@pytest.mark.parametrize("structured", [True, False])
def test_the_fused_call_serves_the_leading_reads_as_the_core_would(image: tuple[int, bytes], structured: bool) -> None:
    """``serve_reads`` on received bytes: the run of READs the scanner takes is served as read_batch serves it,
    and it stops at the first header the scanner would not take (here a WRITE, left with the rest for the
    core); an incomplete header at the end is left too."""
    fd, data = image
    reads = [(7, 4096, 4096), (1 << 40, 12345, 777), (3, SIZE - 1, 1), (9, 0, 65535)]
    write = REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 11, 0, 4) + b"abcd"
    prefix = b"x" * 5
    arena = memoryview(bytearray(256 * 1024))
    expected = b"".join(
        replies.read_header(structured, cookie, offset, length) + data[offset : offset + length]
        for cookie, offset, length in reads
    )
    src = prefix + headers(reads) + write + headers(reads)
    pos, at, count, missed = serve(src, fd, arena, pos=len(prefix), at=100, structured=structured)
    assert (pos, at, count, missed) == (len(prefix) + 4 * REQUEST.size, 100 + len(expected), 4, False)
    assert bytes(arena[100:at]) == expected
    whole = headers(reads[:2])
    assert serve(whole + whole[:27], fd, arena)[::2] == (2 * REQUEST.size, 2)


def test_the_fused_call_takes_only_what_the_scanner_takes(image: tuple[int, bytes]) -> None:
    """Every header the scanner refuses (see the test above) stops the fused call before it, unserved."""
    fd, data = image
    arena = memoryview(bytearray(64 * 1024))
    good = headers([(1, 0, 4096)])
    for bad in (
        REQUEST.pack(c.REQUEST_MAGIC + 1, 0, c.CMD_READ, 2, 0, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, c.CMD_FLAG_FUA, c.CMD_READ, 2, 0, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 2, 0, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 0, 0),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, SIZE - 4095, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, (1 << 64) - 4096, 4096),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 0, 65536),
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 100, 512),
    ):
        src = good + bad + good
        pos, at, count, missed = batch.serve_reads(
            src, 0, len(src), SIZE, 32 << 20, 511, 65536, fd, arena, 0, False, 1 << 30, SMALL_REPLY, 99
        )
        assert (pos, at, count, missed) == (REQUEST.size, 16 + 4096, 1, False)
        assert bytes(arena[16:at]) == data[:4096]


def test_the_fused_call_stops_at_the_budget_the_arena_most_and_a_miss(image: tuple[int, bytes]) -> None:
    fd, _ = image
    src = headers([(i, 4096 * i, 4096) for i in range(8)])
    arena = memoryview(bytearray(64 * 1024))
    one = cost(c.CMD_READ, 4096)
    reply = 16 + 4096
    assert serve(src, fd, arena, room=2 * one + one // 2) == (2 * REQUEST.size, 2 * reply, 2, False)
    small = memoryview(bytearray(100 + 3 * reply + 10))
    assert serve(src, fd, small, at=100) == (3 * REQUEST.size, 100 + 3 * reply, 3, False)
    assert serve(src, fd, arena, most=1) == (REQUEST.size, reply, 1, False)
    assert serve(src, fd, arena, room=0) == (0, 0, 0, False)
    assert serve(src, fd, arena, room=-one) == (0, 0, 0, False)  # an overdrawn budget (Ledger.room < 0)
    r, w = os.pipe()  # preadv2 fails on a pipe, as a cold page's RWF_NOWAIT read does: nothing is taken
    try:
        assert serve(src, r, arena) == (0, 0, 0, True)  # stopped at a miss: the caller is told
    finally:
        os.close(r)
        os.close(w)
    for bad in ({"pos": len(src) + 1}, {"at": len(arena) + 1}, {"pos": -1}):
        with pytest.raises(ValueError):
            serve(src, fd, arena, **bad)
