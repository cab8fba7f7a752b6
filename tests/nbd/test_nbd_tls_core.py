"""The STARTTLS state machine of the sans-IO core, byte for byte (the spec's NOTLS, optional and FORCEDTLS)."""

from __future__ import annotations

import struct

import pytest

from cachemode.nbd import constants as c
from cachemode.nbd.handshake import Aborted, Handshake, OptionSeen, ProtocolError, Ready, StartTLS, State, TLSMode
from tests.nbd.test_nbd_core import EXPORT, SIZE, go_data, meta_data, opt, parse_replies

ACK_STARTTLS = struct.pack(">QIII", c.OPTION_REPLY_MAGIC, c.OPT_STARTTLS, c.REP_ACK, 0)
TLS_REQD_TEXT = b"TLS is required: send NBD_OPT_STARTTLS first"


def started(tls: TLSMode, cflags: int = 3) -> Handshake:
    hs = Handshake(EXPORT, tls=tls)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", cflags))
    return hs


def upgraded(tls: TLSMode) -> Handshake:
    hs = started(tls)
    events = hs.receive_data(opt(c.OPT_STARTTLS))
    assert events == [StartTLS()]
    assert hs.data_to_send() == ACK_STARTTLS
    hs.tls_started()
    return hs


@pytest.mark.parametrize(
    "option,data",
    [
        (c.OPT_LIST, b""),
        (c.OPT_INFO, go_data()),
        (c.OPT_GO, go_data()),
        (c.OPT_STRUCTURED_REPLY, b""),
        (c.OPT_LIST_META_CONTEXT, meta_data(b"disk", b"base:allocation")),
        (c.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")),
        (c.OPT_EXTENDED_HEADERS, b""),
        (99, b"junk"),
    ],
)
def test_require_answers_everything_before_tls_with_tls_reqd(option: int, data: bytes) -> None:
    hs = started(TLSMode.REQUIRE)
    events = hs.receive_data(opt(option, data))
    reply = struct.pack(">QIII", c.OPTION_REPLY_MAGIC, option, c.REP_ERR_TLS_REQD, len(TLS_REQD_TEXT))
    assert hs.data_to_send() == reply + TLS_REQD_TEXT  # that, and nothing about the export
    assert events == [OptionSeen(option, c.REP_ERR_TLS_REQD)]
    assert hs.state is State.NEGOTIATING and not hs.structured


def test_require_oversized_option_gets_tls_reqd_not_too_big() -> None:
    hs = started(TLSMode.REQUIRE)
    big = c.MAX_OPTION_DATA + 10
    hs.receive_data(struct.pack(">QII", c.IHAVEOPT, c.OPT_LIST, big) + bytes(big))
    assert parse_replies(hs.data_to_send()) == [(c.OPT_LIST, c.REP_ERR_TLS_REQD, TLS_REQD_TEXT)]


def test_require_export_name_before_tls_closes_without_a_byte() -> None:
    hs = started(TLSMode.REQUIRE)
    with pytest.raises(ProtocolError, match="EXPORT_NAME before STARTTLS"):
        hs.receive_data(opt(c.OPT_EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == b""
    assert hs.state is State.CLOSED


def test_require_abort_before_tls_is_acknowledged() -> None:
    hs = started(TLSMode.REQUIRE)
    assert hs.receive_data(opt(c.OPT_ABORT)) == [Aborted()]
    assert hs.data_to_send() == struct.pack(">QIII", c.OPTION_REPLY_MAGIC, c.OPT_ABORT, c.REP_ACK, 0)


def test_require_drops_a_client_without_fixed_newstyle() -> None:
    hs = Handshake(EXPORT, tls=TLSMode.REQUIRE)
    hs.data_to_send()
    with pytest.raises(ProtocolError, match="fixed newstyle"):
        hs.receive_data(struct.pack(">I", 0))


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_starttls_then_negotiation_restarts_inside_tls(mode: TLSMode) -> None:
    hs = started(mode)
    assert hs.receive_data(opt(c.OPT_STARTTLS)) == [StartTLS()]
    assert hs.data_to_send() == ACK_STARTTLS
    assert hs.state is State.TLS_PENDING
    with pytest.raises(ProtocolError):  # no byte may reach the core until the transport runs TLS
        hs.receive_data(opt(c.OPT_LIST))
    hs.tls_started()
    assert hs.tls_active and hs.state is State.NEGOTIATING
    hs.receive_data(opt(c.OPT_STRUCTURED_REPLY))
    assert parse_replies(hs.data_to_send()) == [(c.OPT_STRUCTURED_REPLY, c.REP_ACK, b"")]
    events = hs.receive_data(opt(c.OPT_GO, go_data()))
    assert isinstance(events[-1], Ready) and events[-1].negotiated.structured
    assert parse_replies(hs.data_to_send())[-1] == (c.OPT_GO, c.REP_ACK, b"")


def test_second_starttls_inside_tls_is_invalid_and_never_tls_reqd() -> None:
    hs = upgraded(TLSMode.REQUIRE)
    hs.receive_data(opt(c.OPT_STARTTLS))
    assert parse_replies(hs.data_to_send()) == [(c.OPT_STARTTLS, c.REP_ERR_INVALID, b"TLS is already running")]
    hs.receive_data(opt(c.OPT_LIST))
    assert [r[1] for r in parse_replies(hs.data_to_send())] == [c.REP_SERVER, c.REP_ACK]


def test_starttls_with_data_is_invalid() -> None:
    hs = started(TLSMode.ON)
    hs.receive_data(opt(c.OPT_STARTTLS, b"x"))
    assert parse_replies(hs.data_to_send()) == [(c.OPT_STARTTLS, c.REP_ERR_INVALID, b"STARTTLS takes no data")]
    assert hs.state is State.NEGOTIATING


def test_plaintext_after_starttls_is_refused_not_carried_into_tls() -> None:
    # An attacker's option injected behind STARTTLS in plaintext must not be taken as said inside TLS.
    hs = started(TLSMode.ON)
    with pytest.raises(ProtocolError, match="after STARTTLS"):
        hs.receive_data(opt(c.OPT_STARTTLS) + opt(c.OPT_STRUCTURED_REPLY))
    assert hs.data_to_send() == b""  # not even the ACK
    assert hs.state is State.CLOSED


def test_state_negotiated_in_plaintext_is_forgotten() -> None:
    hs = started(TLSMode.ON)
    hs.receive_data(opt(c.OPT_STRUCTURED_REPLY) + opt(c.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")))
    assert hs.structured and hs.meta_context_id is not None
    hs.data_to_send()
    hs.receive_data(opt(c.OPT_STARTTLS))
    hs.data_to_send()
    hs.tls_started()
    assert not hs.structured and hs.meta_context_id is None
    events = hs.receive_data(opt(c.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(events[-1], Ready)
    assert hs.data_to_send() == struct.pack(">QH", SIZE, EXPORT.transmission_flags(False))


def test_on_serves_plain_clients_unchanged() -> None:
    hs = started(TLSMode.ON)
    events = hs.receive_data(opt(c.OPT_GO, go_data()))
    assert isinstance(events[-1], Ready)
    assert parse_replies(hs.data_to_send())[-1] == (c.OPT_GO, c.REP_ACK, b"")


def test_off_answers_starttls_unsup_and_tls_started_is_refused() -> None:
    hs = started(TLSMode.OFF)
    hs.receive_data(opt(c.OPT_STARTTLS))
    assert parse_replies(hs.data_to_send())[0][1] == c.REP_ERR_UNSUP
    with pytest.raises(ProtocolError):
        hs.tls_started()
