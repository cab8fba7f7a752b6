"""TLS for the NBD server: the server's SSL context (nbdkit's options and file names), and the upgrade of a live
connection once the sans-IO core has acknowledged NBD_OPT_STARTTLS.

The core decides (:class:`cachemode.nbd.handshake.StartTLS`); this module only moves the connection onto TLS with
``loop.start_tls``. That works with uvloop, which the server runs on: ``uvloop.Loop.start_tls`` accepts its own TCP
and Unix transports and wraps them in uvloop's ``SSLProtocol`` (a port of CPython 3.11's memory-BIO TLS layer),
which hands decrypted bytes to a :class:`asyncio.BufferedProtocol` through ``get_buffer``/``buffer_updated`` --
so a WRITE payload is still decrypted straight into the parser's buffer -- and falls back to ``data_received``
only for a plain protocol. The upgrade keeps these rules:

* reading from the socket is paused in the same callback that queued the ACK, so not one byte of the
  client's ClientHello can reach the plaintext parser (the core also refuses bytes that arrived after STARTTLS
  in the same read: they were sent before the client saw the ACK);
* the connection's ``_sock_fd`` becomes -1 at once: sendfile, writev and splice would bypass the encryption;
* the handshake time limit keeps running through the TLS handshake (and bounds it a second time as
  ``ssl_handshake_timeout``); a TLS handshake that fails, times out or meets garbage ends that connection only;
* the TLS layer does not report a connection lost during its own handshake to the application protocol, so the
  upgrade does it, once;
* CPython's own loop (the fallback where uvloop is not installed) hands over the first decrypted bytes before
  ``start_tls`` has returned, uvloop only after: they are kept until the connection writes through TLS.

Memory: a TLS connection costs more than a plain one, and outside the connection's memory budget
(:mod:`cachemode.nbd.budget`, which counts the replies held back in :class:`TLSChannel` as queued): OpenSSL's
session and record buffers, uvloop's 256 KiB TLS receive buffer (``SSL_READ_MAX_SIZE``, touched once a large
WRITE arrives), and the incoming memory BIO, which pauses the socket at 256 KiB of undecrypted data but, like
every OpenSSL memory BIO, keeps the largest size it grew to. Replies never pile up in the outgoing BIO (see
:class:`TLSChannel`). Measured (resident memory of the server per idle connection, 20-40 connections): 2 KiB
plain, 37 KiB TLS after 4 KiB I/O, about 0.6 MiB TLS after 1 MiB or 32 MiB READs and WRITEs (6 MiB before
:class:`TLSChannel`).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachemode.errors import CachemodeError
from cachemode.nbd.handshake import TLSMode

if TYPE_CHECKING:
    from cachemode.nbd.connection import NBDConnection

log = logging.getLogger("cachemode.nbd")

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

TLS_WRITE_CHUNK = 64 * 1024
"""The most plaintext handed to the TLS layer in one write (see :class:`TLSChannel`)."""
TLS_WRITE_HIGH_WATER = 64 * 1024
"""Encrypted bytes the TLS layer may hold for a full socket before replies wait in plaintext (see
:class:`TLSChannel`); like the socket transport's limit, also how stale the budget's view may get."""

TLS_CLOSE_WAIT = 5.0
"""Seconds a closing TLS connection waits for the last replies to leave and for the client's close_notify
(idle clients do not read, and would hold a shutdown for the TLS layer's default 30 s)."""

_upgrades: set[asyncio.Task[None]] = set()  # running upgrades, so none is garbage-collected half-way


class TLSSetupError(CachemodeError):
    """The TLS options cannot be used (missing or bad certificates, a bad PSK file, an old Python)."""


@dataclass(frozen=True)
class TLSConfig:
    """How the server offers TLS: ``mode`` (on: optional, require: nbdkit's ``--tls=require``) and the context."""

    mode: TLSMode
    context: ssl.SSLContext
    kind: str
    """What authenticates the peers, for the ready line: "x509", "x509 verify-peer" or "psk"."""


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec: TLS 1.2 or later, older ones not by default
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def x509_context(directory: str | Path, verify_peer: bool) -> ssl.SSLContext:
    """The context for ``--tls-certificates DIR`` (the layout nbdkit and QEMU's tls-creds-x509 use): the
    server's certificate and key, and with ``verify_peer`` a client certificate signed by ``ca-cert.pem``."""
    cert_dir = Path(directory)
    needed = [SERVER_CERT, SERVER_KEY] + ([CA_CERT] if verify_peer else [])
    missing = [name for name in needed if not (cert_dir / name).is_file()]
    if missing:
        raise TLSSetupError(
            f"{cert_dir}: no {', '.join(missing)} (--tls-certificates DIR holds {SERVER_CERT}, {SERVER_KEY} "
            f"and, for --tls-verify-peer, {CA_CERT})"
        )
    ctx = _base_context()
    try:
        ctx.load_cert_chain(cert_dir / SERVER_CERT, cert_dir / SERVER_KEY)
        if verify_peer:
            ctx.load_verify_locations(cafile=cert_dir / CA_CERT)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(f"{cert_dir}: cannot load the certificates: {exc}") from None
    return ctx


def read_psk_file(path: str | Path) -> dict[str, bytes]:
    """nbdkit's ``--tls-psk`` file (the format of GnuTLS's psktool): one ``username:hexkey`` per line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TLSSetupError(f"{path}: cannot read the PSK file: {exc.strerror or exc}") from None
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        user, sep, hexkey = line.partition(":")
        try:
            key = binascii.unhexlify(hexkey.strip())
        except (binascii.Error, ValueError):
            key = b""
        if not sep or not user or not key:
            raise TLSSetupError(f"{path}:{number}: not a 'username:hexkey' line")
        keys[user] = key
    if not keys:
        raise TLSSetupError(f"{path}: no keys in the PSK file")
    return keys


def psk_context(path: str | Path) -> ssl.SSLContext:
    """The context for ``--tls-psk FILE``: needs the ssl module's PSK callbacks (Python 3.13 or later)."""
    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        version = "Python " + ".".join(map(str, sys.version_info[:2]))
        raise TLSSetupError(f"--tls-psk needs Python 3.13 or later (TLS-PSK in the ssl module), not {version}")
    keys = read_psk_file(path)
    ctx = _base_context()
    # Python's PSK callbacks serve TLS 1.2 PSK cipher suites (see the ssl module's documentation).
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("PSK")
    ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))  # type: ignore[attr-defined]
    return ctx


def start_tls(conn: NBDConnection, context: ssl.SSLContext) -> None:
    """Move ``conn`` onto TLS; called in the callback that queued the STARTTLS ACK."""
    assert conn.transport is not None
    conn.transport.pause_reading()  # now, not when the upgrade task first runs: no TLS byte may reach the core
    task = conn.loop.create_task(_upgrade(conn, conn.transport, context))
    _upgrades.add(task)
    task.add_done_callback(_upgrades.discard)


async def _upgrade(conn: NBDConnection, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
    early = _Early(conn)
    try:
        tls = await conn.loop.start_tls(
            raw,
            early,
            context,
            server_side=True,
            ssl_handshake_timeout=conn.server.handshake_limit or None,
            ssl_shutdown_timeout=TLS_CLOSE_WAIT,
        )
    except Exception as exc:  # any failure of the TLS handshake ends this connection, and only this one
        log.info("%s: closing: TLS handshake failed: %s", conn.peer, exc or type(exc).__name__)
        tls = None
    if tls is None or tls.is_closing() or conn.closed:
        raw.abort()
        if not conn.closed:  # the TLS layer reports no loss during its handshake: once, here
            conn.connection_lost(None)
        return
    tls.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
    channel = TLSChannel(conn, tls)
    tls.set_protocol(channel)
    conn.tls_established(channel)
    if early.data:
        conn.data_received(bytes(early.data))
    if early.eof and not conn.closed:
        conn.eof_received()


class _Early(asyncio.BufferedProtocol):
    """The TLS layer's protocol until ``start_tls`` has returned the TLS transport.

    uvloop hands over the first decrypted bytes only after that, but CPython's own loop (used where uvloop is
    not installed) does so in the same callback that completes the handshake: they are kept here, and given to
    the connection once it writes through TLS. The client must wait for the reply to each option, so this is
    at most what the TLS layer had decrypted at that moment (its receive limit, 256 KiB).
    """

    def __init__(self, conn: NBDConnection) -> None:
        self.conn = conn
        self.data = bytearray()
        self.eof = False
        self._buffer = bytearray(64 * 1024)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buffer[:nbytes]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.conn.closed:  # the upgrade may have reported it already
            self.conn.connection_lost(exc)


class TLSChannel(asyncio.BufferedProtocol):
    """Between a connection and the TLS layer, both ways: the connection's transport, the TLS layer's protocol.

    The TLS layer encrypts whatever it is given at once into its outgoing memory BIO, and an OpenSSL memory BIO
    never gives back the memory it once grew to: a 32 MiB read reply, or replies piling up for a client that
    does not read, would stay allocated to the connection until it closes. So replies are handed over in pieces
    of at most :data:`TLS_WRITE_CHUNK` (each encrypted and passed to the socket's transport, which frees what it
    has sent, before the next), and while more than :data:`TLS_WRITE_HIGH_WATER` waits encrypted in the BIO --
    the socket's transport itself being full -- the rest is held here in plaintext until the TLS layer says it
    drained (``resume_writing``). Every call of the TLS layer goes on to the connection; small replies of one
    batch are joined into one record.
    """

    def __init__(self, conn: NBDConnection, tls: asyncio.Transport) -> None:
        self.tls = tls
        self._conn = conn
        self._held: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._held_size = 0
        self._close_when_sent = False
        # The protocol side, bound once (the TLS layer looks them up when it is handed this protocol, so reads
        # cost no extra call; asyncio.BufferedProtocol as the base makes CPython's loop use them too).
        self.get_buffer = conn.get_buffer
        self.buffer_updated = conn.buffer_updated
        self.data_received = conn.data_received
        self.eof_received = conn.eof_received
        self.connection_lost = conn.connection_lost
        self.pause_writing = conn.pause_writing

    def resume_writing(self) -> None:
        held, self._held = self._held, collections.deque()
        self._held_size = 0
        for data in held:
            self.write(data)
        if self._held or self._full():
            return  # the connection stays paused until the rest is in the TLS layer
        if self._close_when_sent:
            self.tls.close()
            return
        self._conn.resume_writing()

    # -- the transport side --------------------------------------------------------------------------------------
    def _full(self) -> bool:
        return self.tls.get_write_buffer_size() >= TLS_WRITE_HIGH_WATER

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held or self._full():
            self._held.append(data)
            self._held_size += len(data)
        elif len(data) <= TLS_WRITE_CHUNK:
            self.tls.write(data)
        else:
            view = memoryview(data).cast("B")
            for start in range(0, len(view), TLS_WRITE_CHUNK):
                if self._full():
                    self._held.append(view[start:])
                    self._held_size += len(view) - start
                    return
                self.tls.write(view[start : start + TLS_WRITE_CHUNK])

    def writelines(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        # One record and one send for a batch of small replies, where the TLS layer would make one per reply.
        batch = bytearray()
        for data in chunks:
            if len(batch) + len(data) > TLS_WRITE_CHUNK and batch:
                self.write(batch)
                batch = bytearray()
            if len(data) >= TLS_WRITE_CHUNK:
                self.write(data)
            else:
                batch += data
        if batch:
            self.write(batch)

    def get_write_buffer_size(self) -> int:
        """The reply bytes held here: what the connection's memory budget counts as queued.

        The encrypted bytes below (at most :data:`TLS_WRITE_HIGH_WATER` plus one piece in the TLS layer, and the
        socket transport's high-water mark) are left out, as a plain connection's budget is up to one
        high-water mark out of date: those drain with no report to the connection, and a count that stayed
        above zero would keep a request larger than the budget (admitted only into an empty one) waiting
        for ever.
        """
        return self._held_size

    def close(self) -> None:
        """Close once every reply has been handed to the TLS layer (which then sends it and closes)."""
        if self._held:
            self._close_when_sent = True
        else:
            self.tls.close()

    def is_closing(self) -> bool:
        return self._close_when_sent or self.tls.is_closing()

    def abort(self) -> None:
        self._held.clear()
        self._held_size = 0
        self.tls.abort()

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, ...: the TLS transport's own
        return getattr(self.tls, name)
