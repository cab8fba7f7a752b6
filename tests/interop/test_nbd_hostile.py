"""Hostile clients against the memory budgets, the connection limit and the shutdown timeout: real sockets,
in-process servers where the server's own accounting is checked, ``cachemode serve`` subprocesses where the
process's memory and exit are."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from cachemode.disk import open_disk
from cachemode.nbd import constants as c
from cachemode.nbd.budget import CONNECTION_BUDGET, RESERVE, Ledger, cost
from cachemode.nbd.client import Client, ClientError
from tests.nbd.serving import MIB, ServeProcess, ThreadServer, served, wait_for

REQUEST = struct.Struct(">IHHQQI")


def rss(pid: int, field: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1)) * 1024


def read_burst(count: int, size: int) -> bytes:
    return b"".join(
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, i, (i * MIB) % (size - MIB), MIB) for i in range(count)
    )


def pipeliner(port: int, count: int, size: int) -> Client:
    """A client that sends ``count`` 1 MiB READs at once (as much as the server takes) and reads nothing."""
    cl = Client("127.0.0.1", port)
    cl.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        cl.sock.send(read_burst(count, size))
    cl.sock.setblocking(True)
    return cl


def port_of(proc: ServeProcess) -> int:
    return int(proc.uri.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough"])
def test_non_reading_clients_stay_within_their_budget_and_a_good_client_is_served(tmp_path: Path, mode: str) -> None:
    """Four clients pipeline 1 MiB READs and read nothing (inline reads and sendfile in writeback, native AIO
    in none, the pool in writethrough): each connection's account, which counts AIO reads in flight and
    replies in a paused transport, stays within its budget, the server's within its own; a well-behaved
    client is answered meanwhile; and once the pipeliners read, every reply arrives."""
    size = 64 * MIB
    with served(tmp_path / "d.img", mode, size=size) as srv:
        hostile = [pipeliner(srv.port, 128, size) for _ in range(4)]
        conns = list(srv.server._connections)
        assert wait_for(lambda: all(conn._paused_reading for conn in conns))
        good = Client("127.0.0.1", srv.port)
        for i in range(20):
            good.pwrite(bytes([i]) * 4096, i * 4096)
            assert good.pread(4096, i * 4096) == bytes([i]) * 4096
        time.sleep(0.3)  # AIO and pool reads admitted before the pause complete meanwhile
        one = cost(c.CMD_READ, MIB)
        for conn in conns:
            if conn.ledger.held or conn.ledger.queued:
                assert conn.ledger.total <= CONNECTION_BUDGET + one
                # what the transport really holds is what the account says it holds
                assert conn.transport.get_write_buffer_size() <= conn.ledger.queued + one
        assert srv.server.budget.used <= 4 * (CONNECTION_BUDGET + one)
        for cl in hostile:
            cookies = set()
            for _ in range(128):
                reply = cl.read_reply(MIB)
                assert reply.error == 0 and len(reply.data) == MIB
                cookies.add(reply.cookie)
            assert cookies == set(range(128))
            cl.close()
        good.close()
        assert wait_for(lambda: srv.server.budget.used == 0)


def test_write_payloads_wait_for_room_in_the_budget(tmp_path: Path) -> None:
    """WRITE headers announcing large payloads get their buffers only while the budgets allow: with a 4 MiB
    server budget, six clients that each announce a 2 MiB WRITE and send a little of it make the server
    hold at most the budget (plus the reserve each); once they send the rest, every write is done."""
    path = tmp_path / "d.img"
    open_disk(path, create_size=32 * MIB).close()
    disk = open_disk(path)
    srv = ThreadServer(disk, connection_budget=4 * MIB, server_budget=4 * MIB)
    try:
        clients = [Client("127.0.0.1", srv.port) for _ in range(6)]
        length = 2 * MIB
        for i, cl in enumerate(clients):
            cl.sock.sendall(
                REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, i, i * length, length) + bytes([i + 1]) * 1000
            )
        time.sleep(0.3)
        assert srv.server.budget.used <= 4 * MIB + 6 * RESERVE
        waiting = [conn for conn in srv.server._connections if conn.tx is not None and conn.tx.waiting]
        assert len(waiting) >= 4  # room for one 2 MiB payload, the others wait unallocated
        for i, cl in enumerate(clients):
            cl.sock.sendall(bytes([i + 1]) * (length - 1000))
        for i, cl in enumerate(clients):
            reply = cl.read_reply()
            assert (reply.cookie, reply.error) == (i, 0)
            assert cl.pread(4096, i * length + length - 4096) == bytes([i + 1]) * 4096
            cl.close()
        assert wait_for(lambda: srv.server.budget.used == 0)
    finally:
        srv.stop()
        disk.close()


def test_spliced_write_payloads_are_admitted_within_the_budget(tmp_path: Path) -> None:
    """Plain page-cache WRITE payloads that are spliced from the socket hold no buffer, yet each is admitted at
    dispatch and charged like any WRITE: with a 2 MiB server budget, four clients that each announce a 768 KiB
    WRITE and send a little of it get at most the budget (plus the reserve each) admitted -- the others wait,
    unexecuted -- and one that vanishes in the middle of its payload takes its charge with it."""
    path = tmp_path / "d.img"
    open_disk(path, create_size=32 * MIB).close()
    disk = open_disk(path)
    srv = ThreadServer(disk, connection_budget=2 * MIB, server_budget=2 * MIB)
    length = 768 * 1024
    try:
        clients = {i: Client("127.0.0.1", srv.port) for i in range(4)}
        for i, cl in clients.items():
            cl.sock.sendall(
                REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, i, i * length, length) + bytes([i + 1]) * 1000
            )
        conns = srv.server._connections
        assert wait_for(lambda: len([x for x in list(conns) if x._splicing is not None or x._backlog]) == 4)
        splicing = [x for x in list(conns) if x._splicing is not None]
        assert 1 <= len(splicing) <= 2 and srv.server.budget.used <= 2 * MIB + 4 * RESERVE
        assert srv.server.budget.used >= len(splicing) * cost(c.CMD_WRITE, length)
        assert all(x.in_flight == 1 for x in splicing)
        # One of those being spliced vanishes: nothing of its payload is written, its charge is released.
        gone = splicing[0]._splicing.cookie
        clients.pop(gone).close()
        assert wait_for(lambda: srv.server.budget.used <= 2 * MIB - cost(c.CMD_WRITE, length) + 4 * RESERVE)
        for i, cl in clients.items():
            cl.sock.sendall(bytes([i + 1]) * (length - 1000))
        for i, cl in clients.items():
            reply = cl.read_reply()
            assert (reply.cookie, reply.error) == (i, 0)
            assert cl.pread(4096, i * length + length - 4096) == bytes([i + 1]) * 4096
            cl.close()
        assert path.read_bytes()[gone * length : (gone + 1) * length] == bytes(length)
        assert wait_for(lambda: srv.server.budget.used == 0)
    finally:
        srv.stop()
        disk.close()


@pytest.mark.parametrize("split", [False, True])
def test_requests_before_a_bad_magic_are_executed_and_answered_then_closed(tmp_path: Path, split: bool) -> None:
    """Valid requests followed by a bad header: executed and answered, then the connection closes -- whether
    the bytes arrive in one segment or two."""
    path = tmp_path / "d.img"
    with served(path, size=16 * MIB) as srv:
        cl = Client("127.0.0.1", srv.port, structured=False)
        write = REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 8192, 512) + b"w" * 512
        read = REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 8192, 512)
        bad = b"\xde\xad\xbe\xef" + bytes(24)
        if split:
            cl.sock.sendall(write + read)
            time.sleep(0.2)
            cl.sock.sendall(bad)
        else:
            cl.sock.sendall(write + read + bad)
        replies = {}
        for _ in range(2):  # simple replies, in completion order: only the READ's carries data
            magic, error, cookie = struct.unpack(">IIQ", cl.sock.recv(16, socket.MSG_WAITALL))
            assert magic == c.SIMPLE_REPLY_MAGIC
            replies[cookie] = (error, cl.sock.recv(512, socket.MSG_WAITALL) if cookie == 2 else b"")
        assert replies == {1: (0, b""), 2: (0, b"w" * 512)}
        assert cl.sock.recv(1) == b""  # then closed
        cl.sock.close()
    assert path.read_bytes()[8192 : 8192 + 512] == b"w" * 512


def test_max_connections_refuses_the_excess_before_the_greeting(tmp_path: Path) -> None:
    proc = ServeProcess([str(tmp_path / "d.img"), "--create", "16M", "--max-connections", "2"])
    try:
        port = port_of(proc)
        first, second = Client("127.0.0.1", port), Client("127.0.0.1", port)
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert third.recv(18) == b""  # closed without a greeting
        third.close()
        second.close()
        fourth = None
        deadline = time.monotonic() + 20
        while fourth is None:  # a slot is free again once the server has seen the close
            try:
                fourth = Client("127.0.0.1", port)
            except (OSError, ClientError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        fourth.pwrite(b"x" * 512, 0)
        assert first.pread(512, 0) == b"x" * 512
        first.close()
        fourth.close()
    finally:
        status, _, err = proc.stop()
    assert status == 0
    assert "refused" in err and "max-connections" in err


def test_bad_limits_are_one_line_errors(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    for option in (
        ["--max-connections", "0"],
        ["--shutdown-timeout", "-1"],
        ["--connection-budget", "0"],
        ["--memory-budget", "16M"],
    ):
        res = run_cli("serve", str(tmp_path / "d.img"), "--create", "1M", *option)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_shutdown_timeout_bounds_the_wait_for_a_client_that_does_not_read(tmp_path: Path) -> None:
    """SIGTERM while a client reads nothing: the server drops it after --shutdown-timeout and exits 0 (the
    default would wait 30 s)."""
    proc = ServeProcess([str(tmp_path / "d.img"), "--create", "64M", "--cache", "none", "--shutdown-timeout", "1"])
    cl = pipeliner(port_of(proc), 64, 64 * MIB)
    try:
        time.sleep(0.3)
        status, _, err = proc.stop(timeout=20)
    finally:
        cl.sock.close()
    assert status == 0
    assert "dropping 1 connection" in err


def test_a_second_signal_drops_connections_at_once(tmp_path: Path) -> None:
    proc = ServeProcess([str(tmp_path / "d.img"), "--create", "64M", "--shutdown-timeout", "600"])
    cl = pipeliner(port_of(proc), 64, 64 * MIB)
    try:
        time.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.proc.poll() is None  # still waiting for the client that does not read
        status, _, _ = proc.stop(timeout=20)  # the second SIGTERM
    finally:
        cl.sock.close()
    assert status == 0


def test_serve_memory_stays_bounded_and_returns_after_pipeliners_leave(tmp_path: Path) -> None:
    """Eight non-reading pipeliners against ``serve --cache none``: the process's peak RSS stays within what
    the budgets allow (before them, each cost the server ~60-110 MiB), and once they leave its RSS comes back
    within 64 MiB of where it started."""
    size = 256 * MIB
    proc = ServeProcess([str(tmp_path / "d.img"), "--create", str(size), "--cache", "none"])
    try:
        port = port_of(proc)
        with Client("127.0.0.1", port) as warm:
            warm.pread(4096, 0)
        time.sleep(0.3)
        start = rss(proc.pid)
        hostile = [pipeliner(port, 256, size) for _ in range(8)]
        time.sleep(2)
        peak = rss(proc.pid, "VmHWM")
        assert peak - start < 8 * (CONNECTION_BUDGET + 2 * MIB) + 64 * MIB, (start, peak)
        for cl in hostile:
            cl.sock.close()
        assert wait_for(lambda: rss(proc.pid) < start + 64 * MIB, timeout=10), (start, rss(proc.pid))
    finally:
        status, _, err = proc.stop()
    assert status == 0, err


def test_idle_connections_cost_little(tmp_path: Path) -> None:
    """300 connections that negotiate and then do nothing: under 64 KiB of server memory each (receive
    buffers are shared, not allocated per connection)."""
    proc = ServeProcess([str(tmp_path / "d.img"), "--create", "16M", "--max-connections", "400"])
    socks: list[socket.socket] = []
    try:
        port = port_of(proc)
        with Client("127.0.0.1", port) as warm:
            warm.pread(4096, 0)
        time.sleep(0.3)
        start = rss(proc.pid)
        clients = [Client("127.0.0.1", port) for _ in range(300)]
        socks = [cl.sock for cl in clients]
        time.sleep(0.5)
        per = (rss(proc.pid) - start) / 300
        assert per < 64 * 1024, per
        clients[-1].pwrite(b"i" * 512, 0)  # and they still work
        assert clients[0].pread(512, 0) == b"i" * 512
    finally:
        for s in socks:
            s.close()
        status, _, err = proc.stop()
    assert status == 0, err


def test_serve_help_documents_the_limits() -> None:
    from tests.conftest import run_cli

    out = run_cli("serve", "--help").stdout
    for option in ("--max-connections", "--shutdown-timeout", "--connection-budget", "--memory-budget"):
        assert option in out


def test_a_flood_of_invalid_requests_is_paused_at_the_budget(tmp_path: Path) -> None:
    """Rejected requests cost only their error replies, but a client that sends millions of them and reads
    nothing must not make the server queue millions of replies: reading pauses once its budget is used."""
    with served(tmp_path / "d.img", size=16 * MIB) as srv:
        cl = Client("127.0.0.1", srv.port)
        bad = REQUEST.pack(c.REQUEST_MAGIC, 0, 99, 7, 0, 0) * 65536  # 1.75 MiB of unknown commands
        cl.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60  # a bound for a loaded machine; it ends as soon as reading pauses
        while time.monotonic() < deadline:  # as much as the server and the kernel take
            try:
                sent += cl.sock.send(bad[sent % len(bad) :])  # keep the stream aligned on request boundaries
            except BlockingIOError:
                time.sleep(0.05)
                if srv.server._connections and next(iter(srv.server._connections))._paused_reading:
                    break
        conn = next(iter(srv.server._connections))
        assert conn._paused_reading
        assert conn.transport.get_write_buffer_size() <= CONNECTION_BUDGET + MIB
        assert sent // REQUEST.size * 16 > CONNECTION_BUDGET  # it did send more than the budget's worth
        cl.sock.close()


def test_a_full_server_budget_still_serves_small_requests_and_wakes_large_ones(tmp_path: Path) -> None:
    """Pipeliners fill the server's budget: a well-behaved client's 4 KiB reads are still served (the
    reserve), its 1 MiB read waits -- and is served once a pipeliner leaves and frees its share."""
    path = tmp_path / "d.img"
    open_disk(path, create_size=64 * MIB).close()
    disk = open_disk(path)
    srv = ThreadServer(disk, connection_budget=3 * MIB, server_budget=6 * MIB)
    try:
        hostile = [pipeliner(srv.port, 64, 64 * MIB) for _ in range(4)]
        assert wait_for(lambda: srv.server.budget.used >= 6 * MIB - cost(c.CMD_READ, MIB))
        good = Client("127.0.0.1", srv.port)
        good.pwrite(b"s" * 4096, 0)
        assert good.pread(4096, 0) == b"s" * 4096  # small: within the reserve
        cookie = good.send_request(c.CMD_READ, 0, MIB)
        conn = next(cn for cn in srv.server._connections if cn.peer == str(good.sock.getsockname()))
        assert wait_for(lambda: conn._backlog)  # waiting for room
        hostile[0].sock.close()
        reply = good.read_reply()
        assert reply.cookie == cookie and reply.error == 0 and reply.data[:4096] == b"s" * 4096
        good.close()
        for cl in hostile[1:]:
            cl.sock.close()
    finally:
        srv.stop()
        disk.close()


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_requests_larger_than_the_budget_follow_one_another(tmp_path: Path, mode: str) -> None:
    """A 32 MiB READ is admitted alone. After the previous one's reply, the transport may still hold a few KiB
    it sends without reporting: the next large request must not wait for a report that never comes (it did,
    once in two runs, in none)."""
    with served(tmp_path / "d.img", mode, size=64 * MIB) as srv:
        cl = Client("127.0.0.1", srv.port)
        cl.sock.settimeout(60)
        cl.pwrite(b"b" * 4096, 0)
        for _ in range(8):
            assert cl.pread(32 * MIB, 0)[:4096] == b"b" * 4096
        cl.close()


def test_a_large_request_does_not_wait_for_bytes_the_transport_sends_unreported() -> None:
    """The ledger's rule itself: with nothing admitted and only a stale few KiB queued, a request larger than
    the connection's budget is admitted; with more than the high-water mark queued, it waits."""
    from cachemode.nbd.budget import TRANSPORT_HIGH_WATER, ServerBudget

    budget = ServerBudget(None, limit=256 * MIB, per_connection=8 * MIB)
    ledger = budget.ledger(lambda: None)
    ledger.set_queued(16 * 1024)
    assert ledger.admit(32 * MIB)
    ledger.release(32 * MIB)
    ledger.set_queued(TRANSPORT_HIGH_WATER + 1)
    assert not ledger.admit(32 * MIB)


def test_a_client_vanishing_mid_payload_gives_its_charge_back(tmp_path: Path) -> None:
    """A WRITE payload's buffer is charged when it is handed out; a client that sends the header and part of
    the payload, then leaves, must not keep that share of the server's budget for ever (each one would
    shrink the server's budget until only small requests were served)."""
    path = tmp_path / "d.img"
    open_disk(path, create_size=16 * MIB).close()
    disk = open_disk(path)
    srv = ThreadServer(disk, connection_budget=3 * MIB, server_budget=6 * MIB)
    try:
        for _ in range(4):  # more than the server's budget holds at once
            cl = Client("127.0.0.1", srv.port)
            cl.sock.sendall(REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, 2 * MIB) + b"p" * (256 * 1024))
            assert wait_for(lambda: srv.server.budget.used >= cost(c.CMD_WRITE, 2 * MIB))
            cl.sock.close()
            assert wait_for(lambda: srv.server.budget.used == 0 and not srv.server._connections)
        good = Client("127.0.0.1", srv.port)
        good.pwrite(b"g" * (2 * MIB), 0)  # larger than the reserve: needs the server's budget
        assert good.pread(4096, 0) == b"g" * 4096
        good.close()
    finally:
        srv.stop()
        disk.close()


@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
def test_small_replies_the_transport_holds_are_not_overwritten(tmp_path: Path, mode: str) -> None:
    """Replies to small reads and writes are built in one arena shared by all connections; a client that
    stops reading leaves part of it in its transport, and the server must then build the next replies
    elsewhere. A client pipelines 2,000 small reads of distinct data (and writes; 40 MiB of replies, more
    than the socket buffers hold) without reading, a second client reads meanwhile, then the first reads
    every reply: each carries its own data."""
    path = tmp_path / "d.img"
    data = os.urandom(8 * MIB)
    path.write_bytes(data)
    disk = open_disk(path, mode)
    srv = ThreadServer(disk)
    try:
        slow = Client("127.0.0.1", srv.port)
        expect = {}
        burst = b""
        for i in range(2000):
            cookie = 1000 + i
            if i % 10 == 9:
                burst += REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, cookie, 512 * i, 512) + data[:512]
                expect[cookie] = None
                continue
            length = (4096, 512, 61440, 32768)[i % 4]
            offset = (i * 7919 * 512) % (4 * MIB) + 4 * MIB
            burst += REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, cookie, offset, length)
            expect[cookie] = data[offset : offset + length]
        slow.sock.sendall(burst)
        conn = next(cn for cn in srv.server._connections if cn.peer == str(slow.sock.getsockname()))
        assert wait_for(lambda: conn.transport is not None and conn.transport.get_write_buffer_size() > 0)
        other = Client("127.0.0.1", srv.port)
        for i in range(200):
            offset = (i * 4096 * 13) % (4 * MIB) + 4 * MIB
            assert other.pread(4096, offset) == data[offset : offset + 4096]
        other.close()
        for _ in range(len(expect)):
            reply = slow.read_reply()
            want = expect.pop(reply.cookie)
            assert reply.error == 0 and (want is None or reply.data == want), reply.cookie
        slow.close()
    finally:
        srv.stop()
        disk.close()


@pytest.mark.parametrize("structured", [True, False])
def test_small_reads_served_in_runs_stay_within_a_tiny_budget(
    tmp_path: Path, structured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client pipelines 300 small READs and 150 small WRITEs at once against a connection budget that holds
    three: the run loops take what fits (they never hold more than the budget), the rest wait their turn,
    every reply carries the right data, every write is on the disk, and the budget is all given back."""
    path = tmp_path / "d.img"
    data = os.urandom(8 * MIB)
    path.write_bytes(data)
    disk = open_disk(path)
    budget = 3 * cost(c.CMD_READ, 4096) + 100
    peak = [0, 0]  # the most a connection held after a charge by the run loop, and how many such charges

    original = Ledger.charge

    def charge(self: Ledger, amount: int) -> None:
        original(self, amount)
        peak[0] = max(peak[0], self.held + self.queued)
        peak[1] += 1

    monkeypatch.setattr(Ledger, "charge", charge)
    srv = ThreadServer(disk, connection_budget=budget, server_budget=64 * MIB)
    try:
        cl = Client("127.0.0.1", srv.port, structured=structured)
        reads = {}
        written = {}
        burst = b""
        for i in range(300):
            length = (512, 4096, 12288)[i % 3]
            offset = (i * 77 * 4096) % (4 * MIB - length)
            reads[i + 1] = (offset, length)
            burst += REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, i + 1, offset, length)
            if i % 2:  # and small writes in between, into the other half of the disk
                payload = os.urandom(length)
                at = 4 * MIB + 12288 * (i // 2)
                written[1000 + i] = (at, payload)
                burst += REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1000 + i, at, length)
                burst += payload
        cl.sock.sendall(burst)
        answered: list[int] = []
        for _ in range(len(reads) + len(written)):
            if structured:
                reply = cl.read_reply()
                cookie, error, got = reply.cookie, reply.error, reply.data
            else:  # a simple reply does not say its length: the cookie does
                magic, error, cookie = struct.unpack(">IIQ", cl._recv(16))
                assert magic == c.SIMPLE_REPLY_MAGIC
                got = cl._recv(reads[cookie][1]) if cookie in reads else b""
            assert error == 0
            if cookie in reads:
                offset, length = reads.pop(cookie)
                assert got == data[offset : offset + length]
            else:
                answered.append(cookie)
        assert not reads and sorted(answered) == sorted(written)
        on_disk = path.read_bytes()
        assert all(on_disk[offset : offset + len(payload)] == payload for offset, payload in written.values())
        cl.close()
        assert wait_for(lambda: srv.server.budget.used == 0)
        assert peak[1] and peak[0] <= budget
    finally:
        srv.stop()
        disk.close()
