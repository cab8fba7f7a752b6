"""``_batch.splice_writes`` on its own, on a real socket pair (Unix, and loopback TCP), a real pipe and a real
image file: it takes only whole-header large plain WRITEs the core would stream, writes each payload only once all
of it is in the pipe, leaves everything else in the socket, and stops at the budget, the count and the arena."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemode.nbd import _batch as batch
from cachemode.nbd import constants as c
from cachemode.nbd import replies

KIB = 1024
SIOCOUTQNSD = 0x894B  # bytes a TCP socket has not sent yet
SIZE = 8 << 20
LOW, HIGH = 256 * KIB, 1 << 20
SMALL_REPLY = 4096


def header(cookie: int, offset: int, length: int, command: int = c.CMD_WRITE, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, command, cookie, offset, length)


def connected_pair(family: str) -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a Unix socket pair, or a loopback TCP connection (whose segments the kernel may merge)."""
    if family == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # a payload or two fit in the window
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, theirs


@pytest.fixture(params=["unix", "tcp"])
def rig(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[socket.socket, socket.socket, tuple[int, int, int, int], int]]:
    ours, theirs = connected_pair(request.param)
    ours.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ends: list[int] = []
    for _ in range(2):
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, HIGH)
        ends += [pipe_r, pipe_w]
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    yield ours, theirs, tuple(ends), fd
    for f in (*ends, fd):
        os.close(f)
    ours.close()
    theirs.close()


def call(
    rig: tuple,
    arena: bytearray,
    *,
    room: int = 1 << 30,
    most: int = 64,
    fd: int | None = None,
    pipes: int = 2,
    wait: bool = False,
    with_need: bool = False,
    mapping: mmap.mmap | None = None,
) -> tuple:
    """``splice_writes``' result; without ``wait`` (unless ``with_need``), less its ``need`` (0, or a header's
    worth where the socket holds less: see test_without_waiting_need_is_a_header_or_nothing); without
    ``mapping``, less its ``mapped`` (then 0)."""
    ours, _, ends, image_fd = rig
    ends = ends if pipes == 2 else (*ends[:2], -1, -1)
    *result, mapped = batch.splice_writes(
        ours.fileno(), *ends, image_fd if fd is None else fd, arena, 0, SIZE, 32 << 20, 511, LOW, HIGH,
        room, SMALL_REPLY, most, wait, mapping,
    )  # fmt: skip
    if mapping is not None:
        return (*result, mapped)
    assert mapped == 0
    if wait or with_need:
        return tuple(result)
    assert result[-1] in (0, 28)
    return tuple(result[:-1])


def send_all(sock: socket.socket, data: bytes) -> None:
    """Everything queued on the peer's side before the call: a socket pair has no network in between, and
    over loopback TCP a segment sent is one queued at the other end (so: wait until none is left unsent)."""
    sock.setblocking(True)
    sock.sendall(data)
    if sock.family == socket.AF_INET:
        deadline = time.monotonic() + 10
        while struct.unpack("i", fcntl.ioctl(sock, SIOCOUTQNSD, b"\0" * 4))[0] and time.monotonic() < deadline:
            time.sleep(0.001)


def test_a_run_of_whole_writes_is_written_and_answered_up_to_the_first_other_header(rig: tuple) -> None:
    ours, theirs, _, fd = rig
    a, b = random.Random(1).randbytes(HIGH), random.Random(2).randbytes(LOW)
    read = header(9, 0, 4096, c.CMD_READ)
    send_all(theirs, header(1, 2 << 20, len(a)) + a + header(2, 512, len(b)) + b + read)
    arena = bytearray(4096)
    count, at, charged, errors, partial = call(rig, arena)
    assert (count, errors, partial) == (2, [], None)
    assert charged == len(a) + len(b) + 2 * SMALL_REPLY
    assert bytes(arena[:at]) == replies.simple(1) + replies.simple(2)
    assert os.pread(fd, len(a), 2 << 20) == a
    assert os.pread(fd, len(b), 512) == b
    assert ours.recv(64) == read  # left for the core, whole


@pytest.mark.parametrize(
    "bad",
    [
        header(3, 0, HIGH, flags=c.CMD_FLAG_FUA),  # needs the stack
        header(3, 0, LOW - 512),  # too short to stream
        header(3, 0, HIGH + 512),  # longer than the pipe
        header(3, 100, LOW),  # unaligned
        header(3, SIZE - LOW + 512, LOW),  # past the end
        header(3, 0, LOW, command=c.CMD_WRITE_ZEROES),
        struct.pack(">IHHQQI", 0xDEADBEEF, 0, c.CMD_WRITE, 3, 0, LOW),  # bad magic: the core's to answer
    ],
    ids=["fua", "short", "long", "unaligned", "past-end", "zeroes", "magic"],
)
def test_anything_the_core_must_judge_is_left_in_the_socket(rig: tuple, bad: bytes) -> None:
    ours, theirs, _, fd = rig
    send_all(theirs, bad + bytes(LOW))
    assert call(rig, bytearray(4096)) == (0, 0, 0, [], None)
    assert ours.recv(28) == bad
    assert os.pread(fd, SIZE, 0) == bytes(SIZE)


def test_a_payload_not_all_there_is_handed_back_with_nothing_written(rig: tuple) -> None:
    _, theirs, (pipe_r, *_), fd = rig
    payload = random.Random(3).randbytes(HIGH)
    send_all(theirs, header(4, 0, HIGH) + payload[: HIGH // 2])
    count, at, charged, errors, partial = call(rig, bytearray(4096))
    assert (count, at, charged, errors) == (1, 0, HIGH + SMALL_REPLY, [])
    assert partial == (4, 0, HIGH, HIGH // 2, 0)
    assert os.pread(fd, HIGH, 0) == bytes(HIGH)  # nothing written before the payload is whole
    assert os.read(pipe_r, HIGH) == payload[: HIGH // 2]


def test_stops_at_the_budget_the_count_and_the_arena(rig: tuple) -> None:
    _, theirs, _, _ = rig
    payload = bytes(LOW)
    send_all(theirs, b"".join(header(i, i * LOW, LOW) + payload for i in range(4)))
    assert call(rig, bytearray(4096), room=LOW + SMALL_REPLY)[:2] == (1, 16)  # room for one charge only
    assert call(rig, bytearray(4096), most=1)[:2] == (1, 16)
    assert call(rig, bytearray(16))[:2] == (1, 16)  # arena room for one reply
    assert call(rig, bytearray(4096))[:2] == (1, 16)  # the last one
    assert call(rig, bytearray(4096)) == (0, 0, 0, [], None)  # the socket is empty


def test_a_failed_write_consumes_its_payload_and_reports_the_error(rig: tuple, tmp_path: Path) -> None:
    ours, theirs, _, _ = rig
    read_only = os.open(tmp_path / "disk.img", os.O_RDONLY | os.O_CLOEXEC)
    try:
        send_all(theirs, header(5, 0, LOW) + bytes(LOW) + header(6, 0, 4096, c.CMD_READ))
        count, at, charged, errors, partial = call(rig, bytearray(4096), fd=read_only)
    finally:
        os.close(read_only)
    assert (count, at, errors, partial) == (1, 0, [(5, errno.EBADF)], None)
    assert charged == LOW + SMALL_REPLY
    assert ours.recv(64) == header(6, 0, 4096, c.CMD_READ)


@pytest.mark.parametrize("pipes", [2, 1])
@pytest.mark.parametrize("rig", ["unix"], indirect=True)  # TCP merges small sends into larger segments
def test_a_payload_in_more_fragments_than_a_pipe_has_slots(rig: tuple, pipes: int) -> None:
    """1 MiB in 1 KiB segments needs 1024 slots: the pipes' 512 (256 with one pipe) are full before the
    payload is in; it is handed back, nothing written, the second pipe used before that."""
    _, theirs, ends, fd = rig
    payload = random.Random(4).randbytes(HIGH)
    theirs.setblocking(True)
    theirs.sendall(header(7, 0, HIGH))
    for pos in range(0, HIGH, 1024):
        theirs.sendall(payload[pos : pos + 1024])
    count, at, _, errors, partial = call(rig, bytearray(4096), pipes=pipes)
    assert (count, at, errors) == (1, 0, [])
    cookie, offset, length, first, second = partial
    assert (cookie, offset, length) == (7, 0, HIGH)
    assert first == 256 * 1024 and second == (256 * 1024 if pipes == 2 else 0)
    assert os.read(ends[0], HIGH) == payload[:first]
    if pipes == 2:
        assert os.read(ends[2], HIGH) == payload[first : first + second]
    assert os.pread(fd, HIGH, 0) == bytes(HIGH)


def test_waiting_takes_a_write_only_with_its_whole_payload_and_says_how_much_to_wait_for(rig: tuple) -> None:
    """With ``wait`` a header is left in the socket until its payload is all there: ``need`` is what the
    socket must hold for it, so the caller can sleep on SO_RCVLOWAT; with a header or less, a header's worth."""
    ours, theirs, _, fd = rig
    payload = random.Random(5).randbytes(HIGH)
    assert call(rig, bytearray(4096), wait=True) == (0, 0, 0, [], None, 28)  # nothing there yet
    send_all(theirs, header(8, 0, HIGH)[:10])
    assert call(rig, bytearray(4096), wait=True) == (0, 0, 0, [], None, 28)  # part of a header
    send_all(theirs, header(8, 0, HIGH)[10:] + payload[: HIGH - 1])
    assert call(rig, bytearray(4096), wait=True) == (0, 0, 0, [], None, 28 + HIGH)  # one byte short
    assert os.pread(fd, HIGH, 0) == bytes(HIGH)
    assert ours.recv(28, socket.MSG_PEEK) == header(8, 0, HIGH)  # still the core's, should it come to that
    send_all(theirs, payload[HIGH - 1 :] + header(9, HIGH, LOW) + payload[:100])
    arena = bytearray(4096)
    count, at, charged, errors, partial, need = call(rig, arena, wait=True)
    assert (count, errors, partial, need) == (1, [], None, 28 + LOW)  # the next one is not all there
    assert (bytes(arena[:at]), charged) == (replies.simple(8), HIGH + SMALL_REPLY)
    assert os.pread(fd, HIGH, 0) == payload
    send_all(theirs, payload[100:LOW] + header(10, 0, 4096, c.CMD_READ))
    assert call(rig, bytearray(4096), wait=True)[::5] == (1, 0)  # then a READ: nothing to wait for
    assert os.pread(fd, LOW, HIGH) == payload[:LOW]
    assert ours.recv(64) == header(10, 0, 4096, c.CMD_READ)
    theirs.shutdown(socket.SHUT_WR)
    assert call(rig, bytearray(4096), wait=True) == (0, 0, 0, [], None, 0)  # the end of the stream


def test_without_waiting_need_is_a_header_or_nothing(rig: tuple) -> None:
    """Without ``wait`` (a Unix socket, whose poll ignores SO_RCVLOWAT and which holds only what the sender's
    buffer allows) a payload is taken as it comes, but ``need`` still says when less than a header is there,
    so the caller sleeps until one is instead of handing a header's first bytes to the transport."""
    _, theirs, ends, fd = rig
    payload = random.Random(6).randbytes(LOW)
    assert batch_need(rig) == 28  # nothing there yet
    send_all(theirs, header(11, 0, LOW)[:10])
    assert batch_need(rig) == 28  # part of a header
    send_all(theirs, header(11, 0, LOW)[10:] + payload[:100])
    count, _, _, errors, partial = call(rig, bytearray(4096))
    assert (count, errors, partial[:3]) == (1, [], (11, 0, LOW))  # taken with the payload not all there
    assert os.read(ends[0], LOW) == payload[:100]
    assert os.pread(fd, LOW, 0) == bytes(LOW)  # nothing written before the payload is whole
    theirs.shutdown(socket.SHUT_WR)
    assert batch_need(rig) == 0  # the end of the stream: nothing to wait for


def batch_need(rig: tuple) -> int:
    """``need`` of a call without ``wait`` that takes nothing."""
    result = call(rig, bytearray(4096), with_need=True)
    assert result[:5] == (0, 0, 0, [], None)
    return result[5]


class CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recent")]


def dirty_pages(fd: int, offset: int, length: int) -> int:
    """How many pages of the range are dirty in the page cache (cachestat(2), Linux 6.5); skips the test where
    the kernel lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    span = (ctypes.c_uint64 * 2)(offset, length)
    stat = CacheStat()
    if libc.syscall(451, fd, span, ctypes.byref(stat), 0) != 0:  # __NR_cachestat
        pytest.skip(f"cachestat(2) failed: {os.strerror(ctypes.get_errno())} (it needs Linux 6.5)")
    return stat.dirty


def dirty_and_clean(fd: int, dirty: tuple[int, int], clean: tuple[int, int]) -> None:
    """Make the ``clean`` range written and synced, then the ``dirty`` one written (old bytes) and not yet
    synced; skips where the filesystem keeps written pages dirty whatever is synced (tmpfs)."""
    os.pwrite(fd, random.Random(20).randbytes(clean[1]), clean[0])
    os.fsync(fd)
    os.pwrite(fd, random.Random(21).randbytes(dirty[1]), dirty[0])
    if dirty_pages(fd, *clean) or dirty_pages(fd, *dirty) != dirty[1] // mmap.PAGESIZE:
        pytest.skip("the test directory's filesystem does not clean synced pages (tmpfs?)")


def test_with_the_mapping_a_payload_over_dirty_pages_is_received_into_it(rig: tuple) -> None:
    """With ``wait`` and the image's mapping, a payload whose pages are all dirty in the page cache is received
    into the mapping (``mapped``), one over clean pages is spliced as before; both land whole, both answered."""
    _, theirs, _, fd = rig
    dirty_and_clean(fd, dirty=(2 << 20, HIGH), clean=(4 << 20, HIGH))
    a, b = random.Random(22).randbytes(HIGH), random.Random(23).randbytes(HIGH)
    send_all(theirs, header(1, 2 << 20, HIGH) + a + header(2, 4 << 20, HIGH) + b)
    arena = bytearray(4096)
    with mmap.mmap(fd, SIZE) as mapping:
        count, at, charged, errors, partial, need, mapped = call(rig, arena, wait=True, mapping=mapping)
    assert (count, errors, partial, need, mapped) == (2, [], None, 28, 1)
    assert charged == 2 * (HIGH + SMALL_REPLY)
    assert bytes(arena[:at]) == replies.simple(1) + replies.simple(2)
    assert os.pread(fd, HIGH, 2 << 20) == a
    assert os.pread(fd, HIGH, 4 << 20) == b
    assert dirty_pages(fd, 4 << 20, HIGH) == HIGH // mmap.PAGESIZE  # b went in by splice, a buffered write


def test_without_waiting_a_whole_payload_over_dirty_pages_goes_from_the_pipes_into_the_mapping(rig: tuple) -> None:
    """Without ``wait`` a payload is taken as it comes, into the pipes. Once all of it is there, over pages all
    dirty, it is read from the pipes into the mapping (``mapped``) instead of spliced into the file: still
    nothing written before it is whole. Over clean pages it is spliced."""
    _, theirs, _, fd = rig
    dirty_and_clean(fd, dirty=(2 << 20, LOW), clean=(4 << 20, LOW))
    a, b = random.Random(24).randbytes(LOW), random.Random(26).randbytes(LOW)
    send_all(theirs, header(3, 2 << 20, LOW) + a + header(5, 4 << 20, LOW) + b)
    with mmap.mmap(fd, SIZE) as mapping:
        count, _, _, errors, partial, _, mapped = call(rig, bytearray(4096), mapping=mapping)
    assert (count, errors, partial, mapped) == (2, [], None, 1)
    assert os.pread(fd, LOW, 2 << 20) == a
    assert os.pread(fd, LOW, 4 << 20) == b
    assert dirty_pages(fd, 4 << 20, LOW) == LOW // mmap.PAGESIZE  # b went in by splice, a buffered write


@pytest.mark.parametrize("wait", [True, False], ids=["received", "from-pipes"])
def test_a_fault_in_the_mapping_leaves_the_rest_to_the_file(rig: tuple, wait: bool) -> None:
    """A page of the mapping that cannot be written (here: made read-only) stops the copy into it with EFAULT,
    and the payload lands whole all the same. With ``wait`` the payload is received from the socket into the
    mapping, and the rest is received into memory and pwritten; without, it is read from the pipes into the
    mapping, and the rest stays in the pipes and is spliced into the file."""
    _, theirs, _, fd = rig
    length = HIGH if wait else LOW
    dirty_and_clean(fd, dirty=(2 << 20, length), clean=(4 << 20, length))
    a = random.Random(25).randbytes(length)
    send_all(theirs, header(4, 2 << 20, length) + a)
    libc = ctypes.CDLL(None, use_errno=True)
    with mmap.mmap(fd, SIZE) as mapping:
        view = ctypes.c_char.from_buffer(mapping)
        page = ctypes.addressof(view) + (2 << 20) + length // 2
        try:
            assert libc.mprotect(ctypes.c_void_p(page), mmap.PAGESIZE, mmap.PROT_READ) == 0
            count, at, _, errors, partial, _, mapped = call(rig, bytearray(4096), wait=wait, mapping=mapping)
        finally:
            libc.mprotect(ctypes.c_void_p(page), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
            del view
    assert (count, at, errors, partial, mapped) == (1, 16, [], None, 1)
    assert os.pread(fd, length, 2 << 20) == a
