"""The splice path's own rules on a real socket pair, a real pipe and a real image file: a pipe whose slots
fill before the payload is complete is read out and splicing goes on; nothing is written before the payload
is whole; a write error still consumes the payload."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import threading
from pathlib import Path

import pytest

from cachemode.nbd import _batch as batch
from cachemode.nbd.requests import Request
from cachemode.nbd.splice import PIPES_DRY, PIPES_ENDED, PayloadSplicer, splice_available

pytestmark = pytest.mark.skipif(not splice_available(), reason="no splice(2) here")

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB


class CountingSplicer(PayloadSplicer):
    spills = 0

    def _spill(self) -> bool:
        self.spills += 1
        return super()._spill()


def splice_one(image_fd: int, head: bytes, chunks: list[bytes], pipe_slots: int | None = None) -> tuple:
    """Feed ``chunks`` through a unix socket pair while a splicer consumes them (its pipes cut down to
    ``pipe_slots``); return (error, fatal, spills)."""
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    splicer = CountingSplicer(loop, ours.fileno(), image_fd)
    if pipe_slots:
        for _, pipe_w in splicer._pipes:
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, pipe_slots * 4096)
    finished = loop.create_future()
    req = Request(1, 0, 1, 4096, len(head) + sum(map(len, chunks)))

    def sender() -> None:
        for chunk in chunks:
            theirs.sendall(chunk)
        if not chunks:
            theirs.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=sender)
    thread.start()
    splicer.start(req, head, lambda _r, error, fatal: finished.set_result((error, fatal)))
    try:
        error, fatal = loop.run_until_complete(asyncio.wait_for(finished, 10))
    finally:
        thread.join()
        splicer.close()
        ours.close()
        theirs.close()
        loop.close()
    return error, fatal, splicer.spills


def test_a_pipe_that_fills_is_read_out_and_splicing_goes_on(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    fd = os.open(image, os.O_RDWR)
    try:
        # 1 KiB segments on a unix socket are one pipe slot each: 16 slots hold 16 KiB of a 256 KiB payload
        chunks = [PAYLOAD[i : i + 1024] for i in range(100, len(PAYLOAD), 1024)]
        error, fatal, spills = splice_one(fd, PAYLOAD[:100], chunks, pipe_slots=16)
    finally:
        os.close(fd)
    assert (error, fatal) == (None, False)
    assert spills > 0
    assert image.read_bytes()[4096 : 4096 + len(PAYLOAD)] == PAYLOAD


def test_the_second_pipe_takes_what_the_first_has_no_slots_for(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    fd = os.open(image, os.O_RDWR)
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.setblocking(False)
    splicer = CountingSplicer(loop, ours.fileno(), fd)
    try:
        # 256 segments of 1 KiB, all sent before: more than the first pipe's 128 slots, fewer than both pipes'
        for (_, pipe_w), slots in zip(splicer._pipes, (128, 256), strict=True):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, slots * 4096)
        for i in range(100, len(PAYLOAD), 1024):
            theirs.sendall(PAYLOAD[i : i + 1024])
        outcome: list = []
        splicer.start(Request(1, 0, 1, 4096, len(PAYLOAD)), PAYLOAD[:100], lambda _r, e, f: outcome.append((e, f)))
    finally:
        splicer.close()
        ours.close()
        theirs.close()
        loop.close()
        os.close(fd)
    assert (outcome, splicer.spills) == ([(None, False)], 0)
    assert image.read_bytes()[4096 : 4096 + len(PAYLOAD)] == PAYLOAD


def test_end_of_stream_mid_payload_writes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    fd = os.open(image, os.O_RDWR)
    try:
        loop = asyncio.new_event_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        splicer = PayloadSplicer(loop, ours.fileno(), fd)
        outcome: list = []
        theirs.sendall(PAYLOAD[100:50000])
        theirs.close()
        splicer.start(Request(1, 0, 1, 4096, len(PAYLOAD)), PAYLOAD[:100], lambda _r, e, f: outcome.append((e, f)))
        splicer.close()
        ours.close()
        loop.close()
    finally:
        os.close(fd)
    ((error, fatal),) = outcome
    assert fatal and isinstance(error, ConnectionResetError)
    assert image.read_bytes() == bytes(1 << 20)


def test_a_write_error_still_consumes_the_payload(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    fd = os.open(image, os.O_RDONLY)  # writes fail with EBADF
    try:
        chunks = [PAYLOAD[i : i + 65536] for i in range(100, len(PAYLOAD), 65536)]
        error, fatal, _ = splice_one(fd, PAYLOAD[:100], chunks)
    finally:
        os.close(fd)
    assert not fatal and error is not None and error.errno == errno.EBADF


def test_fill_pipes_says_why_it_stopped_and_drain_pipes_writes_or_drops(tmp_path: Path) -> None:
    """The C halves the splicer runs per wake (``_batch.fill_pipes``, ``_batch.drain_pipes``) on a real socket
    pair, pipe and file: what the socket holds goes into the pipe, and the call says whether the socket ran dry
    or ended; the pipe's bytes then land at the offset, or are read out and dropped."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    pipe_r, pipe_w = os.pipe()
    image = tmp_path / "img"
    image.write_bytes(bytes(8192))
    fd = os.open(image, os.O_RDWR)
    try:
        theirs.sendall(PAYLOAD[:1000])
        assert batch.fill_pipes(ours.fileno(), pipe_w, -1, 3000, 0, 0) == (1000, 0, PIPES_DRY)
        theirs.sendall(PAYLOAD[1000:3000])
        assert batch.fill_pipes(ours.fileno(), pipe_w, -1, 3000, 1000, 0) == (3000, 0, 0)
        assert batch.drain_pipes(pipe_r, -1, 3000, 0, fd, 100, False) == (0, False)
        assert image.read_bytes()[100:3100] == PAYLOAD[:3000]
        theirs.sendall(PAYLOAD[:500])
        theirs.shutdown(socket.SHUT_WR)
        assert batch.fill_pipes(ours.fileno(), pipe_w, -1, 3000, 0, 0) == (500, 0, PIPES_ENDED)
        assert batch.drain_pipes(pipe_r, -1, 500, 0, fd, 0, True) == (
            0,
            False,
        )  # dropped: the pipe is empty, the file as it was
        assert image.read_bytes()[:100] == bytes(100)
        os.set_blocking(pipe_r, False)
        with pytest.raises(BlockingIOError):
            os.read(pipe_r, 1)
    finally:
        for f in (pipe_r, pipe_w, fd):
            os.close(f)
        ours.close()
        theirs.close()
