"""The fixed-newstyle handshake as a sans-IO state machine: bytes in, bytes and events out.

    hs = Handshake(export)
    send(hs.data_to_send())          # the greeting
    while hs.state is State.NEGOTIATING:
        for event in hs.receive_data(recv()):
            ...                       # Ready / Aborted
        send(hs.data_to_send())

TLS (``tls=TLSMode.ON`` or ``REQUIRE``) follows the spec's STARTTLS rules: STARTTLS is acknowledged with
:class:`StartTLS`, after which the transport upgrades the connection and calls :meth:`Handshake.tls_started`;
the option phase then starts again inside TLS with everything negotiated in plaintext forgotten. With
``REQUIRE`` every option before TLS other than STARTTLS and ABORT is answered ERR_TLS_REQD and EXPORT_NAME
ends the connection (it cannot be refused otherwise) -- the spec's FORCEDTLS mode.

A violation that the spec says ends the connection (bad magic, unknown client flags, an unknown export asked
for with EXPORT_NAME) raises :class:`ProtocolError` after queuing nothing further; the transport closes the
socket. Anything else -- an unknown option, a malformed INFO -- is answered with the right error reply and the
negotiation goes on. Option payloads above :data:`constants.MAX_OPTION_DATA` are skipped without being
buffered, so a hostile client cannot make the server hold more than that per connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cachemode.nbd import constants as c
from cachemode.nbd.export import ExportInfo

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
"""The metadata-context id this server gives ``base:allocation``."""

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


class TLSMode(enum.Enum):
    """nbdkit's ``--tls`` values: the spec's NOTLS, optional TLS, and FORCEDTLS."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    NEGOTIATING = "negotiating"
    TLS_PENDING = "tls-pending"
    """STARTTLS was acknowledged: no bytes may reach the core until the transport runs TLS."""
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True)
class Negotiated:
    """What the handshake settled, handed to the transmission phase."""

    export: ExportInfo
    structured: bool
    meta_context_id: int | None
    """The id of ``base:allocation`` when it was selected, else None (BLOCK_STATUS then gets EINVAL)."""
    flags: int
    """The transmission flags the client was sent."""
    no_zeroes: bool
    via: str
    """"GO" or "EXPORT_NAME"."""


@dataclass(frozen=True)
class Ready:
    """Negotiation ended; transmission starts. ``trailing`` is any data that followed in the same read."""

    negotiated: Negotiated
    trailing: bytes


@dataclass(frozen=True)
class Aborted:
    """The client sent NBD_OPT_ABORT (already acknowledged): close the connection."""


@dataclass(frozen=True)
class StartTLS:
    """STARTTLS was acknowledged (the ACK is queued): send it, then upgrade the connection to TLS without
    handing the core another byte, and call :meth:`Handshake.tls_started` once the TLS handshake succeeded."""


@dataclass(frozen=True)
class OptionSeen:
    """An option was answered (for logging and tests)."""

    option: int
    reply: int


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One option reply: magic, option, reply type, length, data."""
    return _OPT_REPLY.pack(c.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def greeting(no_zeroes: bool = True) -> bytes:
    """The 18-byte server greeting for fixed newstyle."""
    flags = c.FLAG_FIXED_NEWSTYLE | (c.FLAG_NO_ZEROES if no_zeroes else 0)
    return struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, flags)


class _OptionError(Exception):
    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply


class Handshake:
    """Server side of the handshake for a single export.

    ``export`` answers to its own name and to the empty (default) name. ``shutting_down`` makes every later
    option that would start transmission fail with ERR_SHUTDOWN. ``tls`` is the server's TLS policy;
    ``tls_active`` is true once the connection runs TLS.
    """

    def __init__(self, export: ExportInfo, *, offer_no_zeroes: bool = True, tls: TLSMode = TLSMode.OFF) -> None:
        self.export = export
        self.offer_no_zeroes = offer_no_zeroes
        self.tls = tls
        self.tls_active = False
        self.state = State.CLIENT_FLAGS
        self.client_flags = 0
        self.structured = False
        self.meta_context_id: int | None = None
        self.shutting_down = False
        self._in = bytearray()
        self._out = bytearray(greeting(offer_no_zeroes))
        self._skip = 0  # bytes of an oversized option still to discard
        self._skip_option = 0

    # -- the sans-IO interface ------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Ready | Aborted | StartTLS | OptionSeen]:
        if self.state in (State.TRANSMISSION, State.CLOSED, State.TLS_PENDING):
            raise ProtocolError(f"handshake data received in state {self.state.value}")
        events: list[Ready | Aborted | StartTLS | OptionSeen] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
            if not self._skip:
                events.append(self._skipped(self._skip_option))
        self._in += view
        while self.state in (State.CLIENT_FLAGS, State.NEGOTIATING) and not self._skip:
            try:
                event = self._step()
            except ProtocolError:
                # Whatever the violation, the connection is over: never leave the state at NEGOTIATING.
                self.state = State.CLOSED
                raise
            if event is None:
                break
            events.append(event)
            if isinstance(event, Ready | Aborted | StartTLS):
                break
        return events

    def tls_started(self) -> None:
        """The transport now runs TLS: negotiation starts again, and nothing said in plaintext counts (a
        man in the middle could have injected it: nbdkit's and QEMU's CVE-2021-3716)."""
        if self.state is not State.TLS_PENDING:
            raise ProtocolError(f"TLS started in state {self.state.value}")
        self.state = State.NEGOTIATING
        self.tls_active = True
        self.structured = False
        self.meta_context_id = None

    def _tls_required(self) -> bool:
        return self.tls is TLSMode.REQUIRE and not self.tls_active

    # -- internals ------------------------------------------------------------------------------------------
    def _step(self) -> Ready | Aborted | StartTLS | OptionSeen | None:
        buf = self._in
        if self.state is State.CLIENT_FLAGS:
            if len(buf) < 4:
                return None
            (flags,) = struct.unpack_from(">I", buf)
            del buf[:4]
            allowed = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if self.offer_no_zeroes else 0)
            if flags & ~allowed:
                self.state = State.CLOSED
                raise ProtocolError(f"client sent unknown or unoffered flags {flags:#x}")
            if self.tls is TLSMode.REQUIRE and not flags & c.FLAG_C_FIXED_NEWSTYLE:
                self.state = State.CLOSED
                raise ProtocolError("TLS is required, and a client without fixed newstyle cannot start it")
            self.client_flags = flags
            self.state = State.NEGOTIATING
            return OptionSeen(-1, 0)
        if len(buf) < _OPT_HDR.size:
            return None
        magic, option, length = _OPT_HDR.unpack_from(buf)
        if magic != c.IHAVEOPT:
            self.state = State.CLOSED
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > c.MAX_OPTION_DATA:
            if option == c.OPT_EXPORT_NAME:
                self.state = State.CLOSED
                raise ProtocolError("EXPORT_NAME with an oversized name")
            del buf[: _OPT_HDR.size]
            have = min(len(buf), length)
            del buf[:have]
            self._skip = length - have
            self._skip_option = option
            if self._skip:
                return None
            return self._skipped(option)
        if len(buf) < _OPT_HDR.size + length:
            return None
        payload = bytes(buf[_OPT_HDR.size : _OPT_HDR.size + length])
        del buf[: _OPT_HDR.size + length]
        try:
            return self._option(option, payload)
        except _OptionError as err:
            return self._reply_error(option, err.reply, str(err))

    def _skipped(self, option: int) -> OptionSeen:
        """The reply to an option whose oversized data was discarded."""
        if self._tls_required() and option not in (c.OPT_STARTTLS, c.OPT_ABORT):
            return self._reply_error(option, c.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        return self._reply_error(option, c.REP_ERR_TOO_BIG, "option data too long")

    def _reply_error(self, option: int, reply: int, message: str) -> OptionSeen:
        self._out += option_reply(option, reply, message.encode())
        return OptionSeen(option, reply)

    def _ack(self, option: int) -> OptionSeen:
        self._out += option_reply(option, c.REP_ACK)
        return OptionSeen(option, c.REP_ACK)

    def _known_export(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _option(self, option: int, data: bytes) -> Ready | Aborted | StartTLS | OptionSeen:
        if option == c.OPT_STARTTLS and self.tls is not TLSMode.OFF:  # without TLS: ERR_UNSUP below
            return self._starttls(data)
        if self._tls_required() and option != c.OPT_ABORT:
            if option == c.OPT_EXPORT_NAME:  # it cannot be answered with an error: the spec says close
                self.state = State.CLOSED
                raise ProtocolError("EXPORT_NAME before STARTTLS while TLS is required")
            raise _OptionError(c.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        if option == c.OPT_EXPORT_NAME:
            name = _decode(data, fatal=True)
            if not self._known_export(name) or self.shutting_down:
                self.state = State.CLOSED
                raise ProtocolError(f"EXPORT_NAME for unknown export {name!r}")
            no_zeroes = bool(self.client_flags & c.FLAG_C_NO_ZEROES)
            flags = self.export.transmission_flags(self.structured)
            self._out += struct.pack(">QH", self.export.size, flags)
            if not no_zeroes:
                self._out += bytes(c.EXPORT_PADDING)
            return self._finish("EXPORT_NAME", flags, no_zeroes)
        if option == c.OPT_ABORT:
            self._ack(option)
            self.state = State.CLOSED
            return Aborted()
        if option == c.OPT_LIST:
            if data:
                raise _OptionError(c.REP_ERR_INVALID, "LIST takes no data")
            name = self.export.name.encode()
            self._out += option_reply(
                option, c.REP_SERVER, struct.pack(">I", len(name)) + name + self.export.description.encode()
            )
            return self._ack(option)
        if option == c.OPT_STRUCTURED_REPLY:
            if data:
                raise _OptionError(c.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.structured = True
            return self._ack(option)
        if option in (c.OPT_INFO, c.OPT_GO):
            return self._info_go(option, data)
        if option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        raise _OptionError(c.REP_ERR_UNSUP, f"option {option} not supported")

    def _starttls(self, data: bytes) -> StartTLS | OptionSeen:
        if self.tls_active:
            raise _OptionError(c.REP_ERR_INVALID, "TLS is already running")
        if data:
            raise _OptionError(c.REP_ERR_INVALID, "STARTTLS takes no data")
        if self._in:
            # The client must wait for the ACK before it starts TLS: bytes already here were sent in plaintext
            # after STARTTLS, and would otherwise be taken as if they came through TLS.
            self.state = State.CLOSED
            raise ProtocolError("data after STARTTLS before its reply")
        self._ack(c.OPT_STARTTLS)
        self.state = State.TLS_PENDING
        return StartTLS()

    def _info_go(self, option: int, data: bytes) -> Ready | OptionSeen:
        if len(data) < 6:
            raise _OptionError(c.REP_ERR_INVALID, "INFO/GO data too short")
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            raise _OptionError(c.REP_ERR_INVALID, "export name length runs past the option")
        name = _decode(data[4 : 4 + name_len])
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            raise _OptionError(c.REP_ERR_INVALID, "INFO/GO request count does not match the option length")
        requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
        if not self._known_export(name):
            raise _OptionError(c.REP_ERR_UNKNOWN, f"unknown export {name!r}")
        if self.shutting_down:
            raise _OptionError(c.REP_ERR_SHUTDOWN, "server shutting down")
        export = self.export
        flags = export.transmission_flags(self.structured)
        if c.INFO_NAME in requests:
            self._out += option_reply(option, c.REP_INFO, struct.pack(">H", c.INFO_NAME) + export.name.encode())
        if c.INFO_DESCRIPTION in requests and export.description:
            self._out += option_reply(
                option, c.REP_INFO, struct.pack(">H", c.INFO_DESCRIPTION) + export.description.encode()
            )
        self._out += option_reply(
            option,
            c.REP_INFO,
            struct.pack(">HIII", c.INFO_BLOCK_SIZE, export.min_block, export.pref_block, export.max_block),
        )
        self._out += option_reply(option, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, export.size, flags))
        self._ack(option)
        if option == c.OPT_INFO:
            return OptionSeen(option, c.REP_ACK)
        return self._finish("GO", flags, no_zeroes=True)

    def _meta_context(self, option: int, data: bytes) -> OptionSeen:
        if not self.structured:
            raise _OptionError(c.REP_ERR_INVALID, "metadata contexts need structured replies first")
        try:
            (name_len,) = struct.unpack_from(">I", data)
            name = _decode(data[4 : 4 + name_len])
            pos = 4 + name_len
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if pos + qlen > len(data):
                    raise struct.error("query runs past the option")
                queries.append(_decode(data[pos : pos + qlen]))
                pos += qlen
        except struct.error:
            raise _OptionError(c.REP_ERR_INVALID, "malformed metadata-context option") from None
        if name_len > len(data) - 8 or pos != len(data):
            raise _OptionError(c.REP_ERR_INVALID, "metadata-context option length mismatch")
        if not self._known_export(name):
            raise _OptionError(c.REP_ERR_UNKNOWN, f"unknown export {name!r}")
        if option == c.OPT_LIST_META_CONTEXT:
            matches = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            if matches:
                self._out += option_reply(option, c.REP_META_CONTEXT, struct.pack(">I", 0) + BASE_ALLOCATION.encode())
            return self._ack(option)
        # SET replaces any earlier selection; a query of "base:" alone is only valid for LIST.
        self.meta_context_id = None
        if BASE_ALLOCATION in queries:
            self.meta_context_id = BASE_ALLOCATION_ID
            self._out += option_reply(
                option, c.REP_META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
            )
        return self._ack(option)

    def _finish(self, via: str, flags: int, no_zeroes: bool) -> Ready:
        trailing = bytes(self._in)
        self._in.clear()
        self.state = State.TRANSMISSION
        return Ready(
            Negotiated(
                export=self.export,
                structured=self.structured,
                meta_context_id=self.meta_context_id if self.structured else None,
                flags=flags,
                no_zeroes=no_zeroes,
                via=via,
            ),
            trailing,
        )


def _decode(data: bytes, fatal: bool = False) -> str:
    if len(data) > c.MAX_STRING:
        if fatal:
            raise ProtocolError("string longer than 4096 bytes")
        raise _OptionError(c.REP_ERR_TOO_BIG, "string longer than 4096 bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if fatal:
            raise ProtocolError("string is not UTF-8") from None
        raise _OptionError(c.REP_ERR_INVALID, "string is not UTF-8") from None
