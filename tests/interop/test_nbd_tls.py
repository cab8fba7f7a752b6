"""TLS against real clients: nbdinfo, nbdcopy and qemu-io over nbds://, plain clients against --tls require and
--tls on, client certificates under --tls-verify-peer, and hostile peers around STARTTLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemode.disk import open_disk
from cachemode.nbd import constants as c
from cachemode.nbd.handshake import TLSMode
from cachemode.nbd.tls import TLSConfig, x509_context
from tests.nbd.serving import MIB, ThreadServer, need, run
from tests.tls_certs import Certificates

pytestmark = pytest.mark.interop

SIZE = 16 * MIB


@contextlib.contextmanager
def tls_served(
    tmp_path: Path,
    certs: Certificates,
    mode: str = "require",
    verify_peer: bool = False,
    cache: str = "writeback",
    **server_options: object,
) -> Iterator[ThreadServer]:
    path = tmp_path / "disk.img"
    if not path.exists():
        open_disk(path, "writeback", create_size=SIZE).close()
    disk = open_disk(path, cache)
    config = TLSConfig(TLSMode(mode), x509_context(certs.server, verify_peer), "x509")
    srv = ThreadServer(disk, tls=config, **server_options)
    try:
        yield srv
    finally:
        srv.stop()
        disk.close()


def nbds(srv: ThreadServer, client_dir: Path) -> str:
    return f"nbds://127.0.0.1:{srv.port}/?tls-certificates={client_dir}"


# -- a raw client, to see every byte ----------------------------------------------------------------------------
def raw_client(srv: ThreadServer, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect: a small window, so the kernel cannot absorb what the client does not read
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", srv.port))
    assert len(recv_exact(sock, 18)) == 18  # greeting
    sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    return sock


def recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            break
        got += k
    return bytes(buf[:got])


def option(sock: socket.socket | ssl.SSLSocket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; return its replies (type, data) up to the final one."""
    sock.sendall(struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        magic, got, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
        assert magic == c.OPTION_REPLY_MAGIC and got == opt
        out.append((rtype, recv_exact(sock, length)))
        if rtype in (c.REP_ACK,) or rtype & c.REP_FLAG_ERROR:
            return out


def start_tls(sock: socket.socket, certs: Certificates) -> ssl.SSLSocket:
    assert option(sock, c.OPT_STARTTLS) == [(c.REP_ACK, b"")]
    ctx = ssl.create_default_context(cafile=certs.client / "ca-cert.pem")
    ctx.load_cert_chain(certs.client / "client-cert.pem", certs.client / "client-key.pem")
    return ctx.wrap_socket(sock, server_hostname="localhost")


def closed_by_server(sock: socket.socket | ssl.SSLSocket) -> bool:
    """True when the server closed the connection (EOF or reset) within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def wait_connections(srv: ThreadServer, count: int) -> int:
    for _ in range(200):
        if srv.server.connections == count:
            break
        time.sleep(0.05)
    return srv.server.connections


def go_data(name: bytes = b"") -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


# -- real clients ------------------------------------------------------------------------------------------------
def test_nbdinfo_over_tls(tmp_path: Path, tls_certs: Certificates) -> None:
    need("nbdinfo")
    with tls_served(tmp_path, tls_certs) as srv:
        info = json.loads(run(["nbdinfo", "--json", nbds(srv, tls_certs.client)]).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == SIZE


@pytest.mark.parametrize("loop,cache", [("uvloop", "writeback"), ("asyncio", "writeback"), ("uvloop", "none")])
def test_nbdcopy_round_trip_over_tls(
    tmp_path: Path, tls_certs: Certificates, loop: str, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nbdcopy's four connections, on uvloop (what the server runs on) and on CPython's own loop (its fallback),
    whose TLS layer hands over the first decrypted bytes before start_tls has returned; and with O_DIRECT, whose
    native-AIO read replies hand the transport a view of their buffer."""
    need("nbdcopy")
    if loop == "asyncio":
        monkeypatch.setattr("tests.nbd.serving.new_event_loop", asyncio.new_event_loop)
    data = os.urandom(SIZE)
    source, back = tmp_path / "source.raw", tmp_path / "back.raw"
    source.write_bytes(data)
    with tls_served(tmp_path, tls_certs, verify_peer=True, cache=cache) as srv:
        uri = nbds(srv, tls_certs.client)
        run(["nbdcopy", str(source), uri])
        run(["nbdcopy", uri, str(back)])
    assert back.read_bytes() == data
    assert (tmp_path / "disk.img").read_bytes() == data


def test_qemu_io_read_write_fua_flush_over_tls(tmp_path: Path, tls_certs: Certificates) -> None:
    need("qemu-io")
    with tls_served(tmp_path, tls_certs, verify_peer=True) as srv:
        commands = [
            "write -P 0xab 0 64k",
            "write -f -P 0xcd 64k 64k",  # -f: FUA
            "flush",
            "read -P 0xab 0 64k",
            "read -P 0xcd 64k 64k",
        ]
        res = run(
            [
                "qemu-io",
                "--object",
                f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_certs.client}",
                "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={srv.port},tls-creds=tls0",
                *[arg for cmd in commands for arg in ("-c", cmd)],
            ]
        )
        flushes = srv.server.stats.flushes
    assert "Pattern verification failed" not in res.stdout, res.stdout
    assert res.stdout.count("read 65536/65536 bytes") == 2, res.stdout
    assert flushes >= 1
    image = (tmp_path / "disk.img").read_bytes()
    assert image[: 64 * 1024] == b"\xab" * 65536 and image[64 * 1024 : 128 * 1024] == b"\xcd" * 65536


# -- policy ------------------------------------------------------------------------------------------------------
def test_plain_client_against_require_gets_tls_reqd_and_nothing_else(tmp_path: Path, tls_certs: Certificates) -> None:
    with tls_served(tmp_path, tls_certs) as srv:
        sock = raw_client(srv)
        for opt, data in [
            (c.OPT_LIST, b""),
            (c.OPT_STRUCTURED_REPLY, b""),
            (c.OPT_INFO, go_data()),
            (c.OPT_GO, go_data()),
            (99, b"x"),
        ]:
            replies = option(sock, opt, data)
            assert [r[0] for r in replies] == [c.REP_ERR_TLS_REQD], (opt, replies)
        sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.OPT_EXPORT_NAME, 0))
        assert closed_by_server(sock)  # no size, no flags: the connection ends
        sock.close()
        if need_nbdinfo():
            res = run(["nbdinfo", f"nbd://127.0.0.1:{srv.port}/"], check=False)
            assert res.returncode != 0 and "description" not in res.stdout


def need_nbdinfo() -> bool:
    from shutil import which

    return which("nbdinfo") is not None


def test_tls_on_serves_plain_and_tls_clients(tmp_path: Path, tls_certs: Certificates) -> None:
    need("nbdinfo")
    with tls_served(tmp_path, tls_certs, mode="on") as srv:
        plain = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/"]).stdout)
        secure = json.loads(run(["nbdinfo", "--json", nbds(srv, tls_certs.client)]).stdout)
    assert plain["TLS"] is False and secure["TLS"] is True
    assert plain["exports"][0]["export-size"] == secure["exports"][0]["export-size"] == SIZE


def test_verify_peer_refuses_clients_without_a_good_certificate(tmp_path: Path, tls_certs: Certificates) -> None:
    need("nbdinfo")
    with tls_served(tmp_path, tls_certs, verify_peer=True) as srv:
        for refused in (tls_certs.anon, tls_certs.rogue):
            res = run(["nbdinfo", "--json", nbds(srv, refused)], check=False)
            assert res.returncode != 0 and '"export-size"' not in res.stdout, (refused, res.stdout)
        good = json.loads(run(["nbdinfo", "--json", nbds(srv, tls_certs.client)]).stdout)
        assert good["exports"][0]["export-size"] == SIZE
        assert wait_connections(srv, 0) == 0


# -- hostile peers -----------------------------------------------------------------------------------------------
def test_garbage_instead_of_client_hello_ends_that_connection_only(tmp_path: Path, tls_certs: Certificates) -> None:
    with tls_served(tmp_path, tls_certs) as srv:
        good = start_tls(raw_client(srv), tls_certs)
        assert [r[0] for r in option(good, c.OPT_LIST)] == [c.REP_SERVER, c.REP_ACK]
        bad = raw_client(srv)
        assert option(bad, c.OPT_STARTTLS) == [(c.REP_ACK, b"")]
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(512))
        assert closed_by_server(bad)
        bad.close()
        assert wait_connections(srv, 1) == 1  # the bad one is gone and accounted for
        # The other connection negotiates on and moves data through TLS.
        assert option(good, c.OPT_STRUCTURED_REPLY) == [(c.REP_ACK, b"")]
        assert option(good, c.OPT_GO, go_data())[-1] == (c.REP_ACK, b"")
        good.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 7, 0, 4096))
        _magic, _flags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(good, 20))
        assert (rtype, cookie, length) == (c.REPLY_TYPE_OFFSET_DATA, 7, 8 + 4096)
        assert recv_exact(good, length) == struct.pack(">Q", 0) + bytes(4096)
        good.close()


def test_handshake_limit_covers_the_tls_handshake(tmp_path: Path, tls_certs: Certificates) -> None:
    with tls_served(tmp_path, tls_certs, handshake_limit=1.0) as srv:
        silent = raw_client(srv)
        assert option(silent, c.OPT_STARTTLS) == [(c.REP_ACK, b"")]
        assert closed_by_server(silent)  # never sent a ClientHello: dropped at the limit, not after 10 s
        silent.close()
        assert wait_connections(srv, 0) == 0


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_replies_to_a_client_that_stops_reading_all_arrive_in_order_of_bytes(
    tmp_path: Path, tls_certs: Certificates, cache: str
) -> None:
    """64 one-MiB READs and a DISC, read only after a pause: the replies that waited (in the socket's transport,
    the TLS layer, and in plaintext behind it) all arrive intact before the server closes."""
    image = tmp_path / "disk.img"
    data = os.urandom(SIZE)
    image.write_bytes(data)
    with tls_served(tmp_path, tls_certs, cache=cache) as srv:
        sock = start_tls(raw_client(srv, rcvbuf=64 * 1024), tls_certs)
        assert option(sock, c.OPT_STRUCTURED_REPLY) == [(c.REP_ACK, b"")]
        assert option(sock, c.OPT_GO, go_data())[-1] == (c.REP_ACK, b"")
        count = 64
        requests = b"".join(
            struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, n, (n % 16) * MIB, MIB) for n in range(count)
        )
        sock.sendall(requests + struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 99, 0, 0))
        time.sleep(1.0)  # the server fills every buffer it may, then waits
        seen = set()
        for _ in range(count):
            _magic, _flags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(sock, 20))
            payload = recv_exact(sock, length)
            assert rtype == c.REPLY_TYPE_OFFSET_DATA and length == 8 + MIB
            offset = (cookie % 16) * MIB
            assert payload[8:] == data[offset : offset + MIB], cookie
            seen.add(cookie)
        assert seen == set(range(count))
        assert closed_by_server(sock)
        sock.close()


def test_requests_larger_than_the_budget_follow_each_other_over_tls(tmp_path: Path, tls_certs: Certificates) -> None:
    """A request larger than the connection's budget is admitted only into an empty one: the encrypted bytes
    still on their way out must not keep it waiting for ever."""
    with tls_served(tmp_path, tls_certs, connection_budget=MIB) as srv:
        sock = start_tls(raw_client(srv), tls_certs)
        assert option(sock, c.OPT_GO, go_data())[-1] == (c.REP_ACK, b"")
        data = os.urandom(4 * MIB)
        for cookie in range(3):
            sock.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, cookie, 0, len(data)) + data)
            assert recv_exact(sock, 16) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, cookie)
            sock.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 100 + cookie, 0, len(data)))
            assert recv_exact(sock, 16) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 100 + cookie)
            assert recv_exact(sock, len(data)) == data
        sock.close()


def test_max_connections_counts_connections_in_their_tls_handshake(tmp_path: Path, tls_certs: Certificates) -> None:
    with tls_served(tmp_path, tls_certs, max_connections=1) as srv:
        first = raw_client(srv)
        assert option(first, c.OPT_STARTTLS) == [(c.REP_ACK, b"")]  # and then silence, mid-handshake
        second = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert closed_by_server(second)  # refused before the greeting
        second.close()
        first.close()
        assert wait_connections(srv, 0) == 0
        third = start_tls(raw_client(srv), tls_certs)  # the slot is free again
        assert [r[0] for r in option(third, c.OPT_LIST)] == [c.REP_SERVER, c.REP_ACK]
        third.close()
