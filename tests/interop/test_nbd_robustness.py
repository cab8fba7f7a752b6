"""Bad and hostile clients against the real server: each harms only its own connection."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from cachemode.disk import open_disk
from cachemode.nbd import constants as c
from cachemode.nbd.budget import CONNECTION_BUDGET
from cachemode.nbd.client import Client
from tests.nbd.serving import MIB, ThreadServer, served

SIZE = 16 * MIB


def connect(srv) -> Client:  # type: ignore[no-untyped-def]
    return Client("127.0.0.1", srv.port)


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_vanishing_client_mid_write_harms_no_one(tmp_path: Path) -> None:
    with served(tmp_path / "d.img", size=SIZE) as srv:
        good = connect(srv)
        good.pwrite(b"g" * 4096, 0)
        bad = connect(srv)
        header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 8 * MIB, MIB)
        bad.sock.sendall(header + b"b" * (MIB // 2))  # half the payload, then gone
        bad.sock.close()
        assert wait_for(lambda: srv.server.connections == 1)
        assert good.pread(4096, 0) == b"g" * 4096
        good.flush()
        good.close()
    data = (tmp_path / "d.img").read_bytes()
    assert data[8 * MIB : 9 * MIB] == bytes(MIB)  # the incomplete write never happened


def test_bad_magic_and_garbage_handshake_end_only_that_connection(tmp_path: Path) -> None:
    with served(tmp_path / "d.img", size=SIZE) as srv:
        good = connect(srv)
        bad = connect(srv)
        bad.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
        assert bad.sock.recv(100) == b""  # closed by the server
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.recv(18)
        raw.sendall(b"\xff\xff\xff\xff")  # unknown client flags: dropped
        assert raw.recv(100) == b""
        raw.close()
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.recv(18)
        raw.sendall(struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8))
        assert raw.recv(100) == b""
        raw.close()
        good.pwrite(b"x" * 512, 512)
        assert good.pread(512, 512) == b"x" * 512
        good.close()


def test_errors_keep_the_connection_and_nothing_outside_is_written(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    with served(path, size=SIZE) as srv:
        cl = connect(srv)
        cl.pwrite(b"e" * 4096, SIZE - 4096)
        for args, error in [
            ((c.CMD_WRITE, SIZE - 2, 4, 0, b"abcd"), c.ENOSPC),
            ((c.CMD_WRITE, 0, 4, 1 << 9, b"abcd"), c.EINVAL),
            ((c.CMD_WRITE_ZEROES, SIZE - 2, 4), c.ENOSPC),
            ((c.CMD_TRIM, SIZE, 1), c.EINVAL),
            ((c.CMD_FLUSH, 4, 0), c.EINVAL),
            ((99, 0, 0), c.EINVAL),
            ((c.CMD_READ, 0, 64 * MIB), c.EOVERFLOW),
        ]:
            cookie = cl.send_request(*args)
            reply = cl.read_reply()
            assert (reply.cookie, reply.error) == (cookie, error), args[:3]
        assert cl.pread(4096, SIZE - 4096) == b"e" * 4096
        cl.close()
    assert path.stat().st_size == SIZE
    assert path.read_bytes()[-4096:] == b"e" * 4096


def test_many_connections_at_once(tmp_path: Path) -> None:
    with served(tmp_path / "d.img", size=SIZE) as srv:
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                with connect(srv) as cl:
                    blob = os.urandom(64 * 1024)
                    for j in range(8):
                        cl.pwrite(blob, (i * 8 + j) * 65536)
                    for j in range(8):
                        assert cl.pread(65536, (i * 8 + j) * 65536) == blob
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_client_that_does_not_read_is_paused_not_buffered(tmp_path: Path, mode: str) -> None:
    """A burst of 256 x 1 MiB READs from a client that reads no reply: the server holds back, its reply
    buffer stays near the high-water mark instead of growing to 256 MiB; every reply still arrives later."""
    with served(tmp_path / "d.img", mode, size=64 * MIB) as srv:
        cl = connect(srv)
        count = 256
        burst = b"".join(
            struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, i, (i % 64) * MIB, MIB) for i in range(count)
        )
        cl.sock.sendall(burst)
        conns = list(srv.server._connections)
        assert len(conns) == 1
        conn = conns[0]
        assert wait_for(lambda: conn._paused_reading)
        time.sleep(0.5)
        peak = conn.transport.get_write_buffer_size()
        assert peak <= CONNECTION_BUDGET + MIB, peak
        seen = set()
        for _ in range(count):
            reply = cl.read_reply(MIB)
            assert reply.error == 0 and len(reply.data) == MIB
            seen.add(reply.cookie)
        assert seen == set(range(count))
        cl.close()


def test_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    open_disk(path, create_size=SIZE).close()
    disk = open_disk(path, "none")
    srv = ThreadServer(disk)
    try:
        cl = connect(srv)
        cookies = [cl.send_request(c.CMD_WRITE, i * 65536, 65536, 0, b"s" * 65536) for i in range(16)]
        cookies.append(cl.send_request(c.CMD_FLUSH))
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        answered = {}
        for _ in cookies:
            reply = cl.read_reply()
            answered[reply.cookie] = reply.error
        assert set(answered) == set(cookies)
        assert set(answered.values()) <= {0, c.ESHUTDOWN}
        stopper.join(timeout=30)
        assert cl.sock.recv(1) == b""  # then the server closed the connection
    finally:
        disk.close()
    data = path.read_bytes()
    for i, cookie in enumerate(cookies[:16]):
        if answered[cookie] == 0:
            assert data[i * 65536 : (i + 1) * 65536] == b"s" * 65536


def test_half_close_after_a_burst_still_gets_every_reply(tmp_path: Path) -> None:
    """End of input (or DISC) means: answer what was asked, then close -- even requests held back."""
    with served(tmp_path / "d.img", size=64 * MIB) as srv:
        cl = connect(srv)
        count = 64
        burst = b"".join(
            struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, i, (i % 64) * MIB, MIB) for i in range(count)
        )
        cl.sock.sendall(burst + struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 999, 0, 0))
        cl.sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        errors = [cl.read_reply(MIB).error for _ in range(count)]
        assert errors == [0] * count
        assert cl.sock.recv(1) == b""
        cl.sock.close()


def test_client_that_never_negotiates_is_dropped(tmp_path: Path) -> None:
    """A connection that stalls in the handshake is closed after the limit; one that negotiated is not."""
    path = tmp_path / "d.img"
    open_disk(path, create_size=SIZE).close()
    disk = open_disk(path)
    srv = ThreadServer(disk, handshake_limit=0.5)
    try:
        idle = connect(srv)  # negotiated: the limit no longer applies to it
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert len(silent.recv(18)) == 18  # the greeting; then say nothing at all
        start = time.monotonic()
        try:
            rest = silent.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b"" and time.monotonic() - start < 5
        silent.close()
        time.sleep(0.6)  # past the limit: the negotiated client still works
        idle.pwrite(b"i" * 512, 0)
        assert idle.pread(512, 0) == b"i" * 512
        idle.close()
    finally:
        srv.stop()
        disk.close()
