"""The sans-IO NBD core, byte for byte, without sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemode.disk.layer import Extent
from cachemode.nbd import constants as c
from cachemode.nbd import replies
from cachemode.nbd.export import ExportInfo, describe_flags
from cachemode.nbd.handshake import (
    Aborted,
    Handshake,
    Negotiated,
    ProtocolError,
    Ready,
    State,
    greeting,
)
from cachemode.nbd.requests import (
    FIRST_READ_AFTER_STREAM,
    Disconnect,
    PayloadFollows,
    ReadRun,
    Rejected,
    Request,
    Transmission,
    Violation,
    WriteRun,
    scan_reads,
)

SIZE = 1 << 20
EXPORT = ExportInfo(name="disk", size=SIZE, description="test export")


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        out.append((option, rtype, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def go_data(name: bytes = b"disk", infos: tuple[int, ...] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def started(export: ExportInfo = EXPORT, cflags: int = 3) -> Handshake:
    hs = Handshake(export)
    assert hs.data_to_send() == greeting(True)
    hs.receive_data(struct.pack(">I", cflags))
    assert hs.state is State.NEGOTIATING
    return hs


# -- handshake -------------------------------------------------------------------------------------------------
def test_greeting_bytes() -> None:
    assert greeting(True) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_unknown_client_flag_drops_connection() -> None:
    hs = Handshake(EXPORT)
    with pytest.raises(ProtocolError):
        hs.receive_data(struct.pack(">I", 4))


def test_no_zeroes_not_offered_must_not_be_set() -> None:
    hs = Handshake(EXPORT, offer_no_zeroes=False)
    with pytest.raises(ProtocolError):
        hs.receive_data(struct.pack(">I", 3))


def test_bad_option_magic_is_fatal() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(struct.pack(">QII", 0x1234, c.OPT_GO, 0))


def test_go_full_reply_byte_for_byte() -> None:
    hs = started()
    events = hs.receive_data(opt(c.OPT_GO, go_data(b"disk", (c.INFO_NAME, c.INFO_DESCRIPTION, c.INFO_BLOCK_SIZE))))
    out = parse_replies(hs.data_to_send())
    flags = EXPORT.transmission_flags(False)
    assert out == [
        (c.OPT_GO, c.REP_INFO, struct.pack(">H", c.INFO_NAME) + b"disk"),
        (c.OPT_GO, c.REP_INFO, struct.pack(">H", c.INFO_DESCRIPTION) + b"test export"),
        (c.OPT_GO, c.REP_INFO, struct.pack(">HIII", c.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)),
        (c.OPT_GO, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, SIZE, flags)),
        (c.OPT_GO, c.REP_ACK, b""),
    ]
    ready = [e for e in events if isinstance(e, Ready)]
    assert ready and ready[0].negotiated.flags == flags and not ready[0].negotiated.structured
    assert hs.state is State.TRANSMISSION


def test_default_export_name_and_unknown_export() -> None:
    hs = started()
    hs.receive_data(opt(c.OPT_INFO, go_data(b"nope")))
    assert parse_replies(hs.data_to_send())[-1][1] == c.REP_ERR_UNKNOWN
    hs.receive_data(opt(c.OPT_INFO, go_data(b"")))
    assert parse_replies(hs.data_to_send())[-1][1] == c.REP_ACK
    assert hs.state is State.NEGOTIATING


def test_malformed_info_is_err_invalid_and_negotiation_goes_on() -> None:
    hs = started()
    hs.receive_data(opt(c.OPT_GO, go_data(b"disk", (1,))[:-1]))
    assert parse_replies(hs.data_to_send())[-1][1] == c.REP_ERR_INVALID
    hs.receive_data(opt(c.OPT_GO, b"\x00\x00"))
    assert parse_replies(hs.data_to_send())[-1][1] == c.REP_ERR_INVALID
    hs.receive_data(opt(c.OPT_GO, go_data()))
    assert hs.state is State.TRANSMISSION


@pytest.mark.parametrize("option", [c.OPT_STARTTLS, c.OPT_EXTENDED_HEADERS, 4, 99, 0xFFFF])
def test_unknown_options_get_unsup(option: int) -> None:
    hs = started()
    hs.receive_data(opt(option, b"junk"))
    assert parse_replies(hs.data_to_send()) == [(option, c.REP_ERR_UNSUP, b"option %d not supported" % option)]
    assert hs.state is State.NEGOTIATING


def test_oversized_option_is_skipped_not_buffered() -> None:
    hs = started()
    big = c.MAX_OPTION_DATA + 1000
    hs.receive_data(struct.pack(">QII", c.IHAVEOPT, 99, big))
    for _ in range(big // 1000):
        hs.receive_data(b"x" * 1000)
        assert len(hs._in) == 0
    assert hs.data_to_send() == b""
    hs.receive_data(b"y" * (big % 1000) + opt(c.OPT_STRUCTURED_REPLY))
    out = parse_replies(hs.data_to_send())
    assert [r[1] for r in out] == [c.REP_ERR_TOO_BIG, c.REP_ACK]


def test_export_name_with_and_without_zeroes() -> None:
    hs = started(cflags=1)
    events = hs.receive_data(opt(c.OPT_EXPORT_NAME, b"disk"))
    flags = EXPORT.transmission_flags(False)
    assert hs.data_to_send() == struct.pack(">QH", SIZE, flags) + bytes(124)
    assert isinstance(events[-1], Ready) and events[-1].negotiated.via == "EXPORT_NAME"
    hs = started(cflags=3)
    hs.receive_data(opt(c.OPT_EXPORT_NAME, b""))
    assert hs.data_to_send() == struct.pack(">QH", SIZE, flags)


def test_export_name_unknown_closes() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(c.OPT_EXPORT_NAME, b"other"))


def test_list_and_abort() -> None:
    hs = started()
    hs.receive_data(opt(c.OPT_LIST))
    out = parse_replies(hs.data_to_send())
    assert out == [
        (c.OPT_LIST, c.REP_SERVER, struct.pack(">I", 4) + b"disk" + b"test export"),
        (c.OPT_LIST, c.REP_ACK, b""),
    ]
    hs.receive_data(opt(c.OPT_LIST, b"x"))
    assert parse_replies(hs.data_to_send())[0][1] == c.REP_ERR_INVALID
    events = hs.receive_data(opt(c.OPT_ABORT))
    assert isinstance(events[-1], Aborted)
    assert parse_replies(hs.data_to_send()) == [(c.OPT_ABORT, c.REP_ACK, b"")]
    assert hs.state is State.CLOSED


def test_meta_context_requires_structured_then_selects_base_allocation() -> None:
    hs = started()
    hs.receive_data(opt(c.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")))
    assert parse_replies(hs.data_to_send())[0][1] == c.REP_ERR_INVALID
    hs.receive_data(opt(c.OPT_STRUCTURED_REPLY))
    hs.receive_data(opt(c.OPT_LIST_META_CONTEXT, meta_data(b"disk")))
    hs.receive_data(opt(c.OPT_LIST_META_CONTEXT, meta_data(b"disk", b"x-foo:bar")))
    hs.receive_data(opt(c.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation", b"x-foo:bar")))
    out = parse_replies(hs.data_to_send())
    assert out == [
        (c.OPT_STRUCTURED_REPLY, c.REP_ACK, b""),
        (c.OPT_LIST_META_CONTEXT, c.REP_META_CONTEXT, b"\x00\x00\x00\x00base:allocation"),
        (c.OPT_LIST_META_CONTEXT, c.REP_ACK, b""),
        (c.OPT_LIST_META_CONTEXT, c.REP_ACK, b""),
        (c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT, b"\x00\x00\x00\x01base:allocation"),
        (c.OPT_SET_META_CONTEXT, c.REP_ACK, b""),
    ]
    hs.receive_data(opt(c.OPT_SET_META_CONTEXT, meta_data(b"disk", b"base:allocation")[:-3]))
    assert parse_replies(hs.data_to_send())[0][1] == c.REP_ERR_INVALID
    events = hs.receive_data(opt(c.OPT_GO, go_data()))
    negotiated = events[-1].negotiated  # type: ignore[union-attr]
    assert negotiated.structured and negotiated.meta_context_id == 1
    assert negotiated.flags & c.TF_SEND_DF


def test_options_split_across_reads() -> None:
    hs = Handshake(EXPORT)
    hs.data_to_send()
    stream = struct.pack(">I", 3) + opt(c.OPT_STRUCTURED_REPLY) + opt(c.OPT_GO, go_data())
    events = []
    for i in range(len(stream)):
        events += hs.receive_data(stream[i : i + 1])
    assert isinstance(events[-1], Ready)


# -- transmission flags ----------------------------------------------------------------------------------------
def test_flags_follow_write_cache() -> None:
    on = ExportInfo(name="", size=SIZE, write_cache=True)
    off = ExportInfo(name="", size=SIZE, write_cache=False)
    assert on.transmission_flags() & (c.TF_SEND_FLUSH | c.TF_SEND_FUA) == c.TF_SEND_FLUSH | c.TF_SEND_FUA
    assert off.transmission_flags() & (c.TF_SEND_FLUSH | c.TF_SEND_FUA) == 0
    ro = ExportInfo(name="", size=SIZE, read_only=True)
    names = describe_flags(ro.transmission_flags(False))
    assert "READ_ONLY" in names and "SEND_TRIM" not in names and "SEND_DF" not in names


# -- requests --------------------------------------------------------------------------------------------------
def req(command: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, command, cookie, offset, length) + data


def tx(structured: bool = True, export: ExportInfo = EXPORT, ctx: int | None = 1) -> Transmission:
    return Transmission(Negotiated(export, structured, ctx, export.transmission_flags(structured), True, "GO"))


def test_read_and_write_parse() -> None:
    t = tx()
    events = t.receive_data(req(c.CMD_READ, 4096, 512) + req(c.CMD_WRITE, 0, 3, data=b"abc", cookie=9))
    assert [type(e) for e in events] == [Request, Request]
    assert (events[0].command, events[0].offset, events[0].length) == (c.CMD_READ, 4096, 512)
    assert bytes(events[1].data) == b"abc" and events[1].cookie == 9


def test_write_payload_split_byte_by_byte() -> None:
    t = tx()
    stream = req(c.CMD_WRITE, 10, 5, data=b"hello") + req(c.CMD_FLUSH)
    events = []
    for i in range(len(stream)):
        events += t.receive_data(stream[i : i + 1])
    assert bytes(events[0].data) == b"hello"
    assert events[1].command == c.CMD_FLUSH


def test_bad_magic_is_fatal() -> None:
    t = tx()
    events = t.receive_data(b"\x00" * 28)
    assert [type(e) for e in events] == [Violation] and t.closed
    assert t.receive_data(req(c.CMD_READ, 0, 1)) == []  # nothing after it is parsed


@pytest.mark.parametrize("cut", [None, 1, 28, 30, 33, 56, 60])
def test_requests_before_a_bad_magic_come_out_however_the_bytes_were_cut(cut: int | None) -> None:
    """Valid requests then a bad header: the same events whether they came in one read or two."""
    stream = req(c.CMD_WRITE, 0, 5, data=b"hello", cookie=1) + req(c.CMD_READ, 0, 512, cookie=2)
    stream += b"\xde\xad\xbe\xef" + bytes(24) + req(c.CMD_READ, 0, 1, cookie=3)
    t = tx()
    parts = [stream] if cut is None else [stream[:cut], stream[cut:]]
    events = [e for part in parts for e in t.receive_data(part)]
    assert [type(e) for e in events] == [Request, Request, Violation]
    assert [e.cookie for e in events[:2]] == [1, 2] and bytes(events[0].data) == b"hello"


def test_read_fast_path_applies_the_minimum_block_size() -> None:
    """A plain in-bounds READ takes the parser's fast path; it must still be refused when misaligned."""
    export = ExportInfo(name="disk", size=SIZE, min_block=512)
    t = tx(export=export)
    events = t.receive_data(req(c.CMD_READ, 100, 512, cookie=1) + req(c.CMD_READ, 512, 100, cookie=2))
    events += t.receive_data(req(c.CMD_WRITE, 1, 512, data=bytes(512), cookie=3) + req(c.CMD_READ, 512, 512, cookie=4))
    assert [(type(e), e.cookie) for e in events] == [(Rejected, 1), (Rejected, 2), (Rejected, 3), (Request, 4)]
    assert all(e.error == c.EINVAL for e in events[:3])


def test_fatal_export_name_leaves_the_handshake_closed() -> None:
    for name in (b"\xff\xfe", b"x" * (c.MAX_STRING + 1), b"unknown"):
        hs = started()
        with pytest.raises(ProtocolError):
            hs.receive_data(opt(c.OPT_EXPORT_NAME, name))
        assert hs.state is State.CLOSED
        with pytest.raises(ProtocolError):
            hs.receive_data(opt(c.OPT_GO, go_data()))


def test_payload_allocation_may_wait() -> None:
    """An ``allocate`` that refuses makes the parser hold the WRITE (header and partial payload) until
    :meth:`resume`; with ``allocate_alone`` it is asked only once the events before it were returned."""
    grant = {"ok": False}
    asked: list[int] = []

    def allocate(n: int) -> bytearray | None:
        asked.append(n)
        return bytearray(n) if grant["ok"] else None

    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    t = Transmission(negotiated, allocate, allocate_alone=True)
    payload = bytes(range(256)) * 256
    stream = req(c.CMD_READ, 0, 512, cookie=1) + req(c.CMD_WRITE, 0, len(payload), cookie=2, data=payload)
    first = t.receive_data(stream[:1000])
    assert [e.cookie for e in first] == [1] and t.waiting and asked == []  # not asked while READ was pending
    assert t.resume() == [] and t.waiting and asked == [len(payload)]  # refused: still waiting
    assert t.receive_data(stream[1000:30000]) == []  # held while waiting
    grant["ok"] = True
    assert t.resume() == [] and not t.waiting
    rest = t.receive_data(stream[30000:] + req(c.CMD_FLUSH, cookie=3))
    assert [e.cookie for e in rest] == [2, 3] and bytes(rest[0].data) == payload


def test_disc() -> None:
    t = tx()
    events = t.receive_data(req(c.CMD_DISC) + req(c.CMD_READ, 0, 1))
    assert [type(e) for e in events] == [Disconnect]
    assert t.receive_data(req(c.CMD_READ, 0, 1)) == []


def errors_of(t: Transmission, data: bytes) -> list[int]:
    return [e.error if isinstance(e, Rejected) else 0 for e in t.receive_data(data)]


@pytest.mark.parametrize(
    ("command", "offset", "length", "flags", "error"),
    [
        (c.CMD_READ, SIZE - 1, 2, 0, c.EINVAL),
        (c.CMD_WRITE_ZEROES, SIZE - 1, 2, 0, c.ENOSPC),
        (c.CMD_TRIM, SIZE, 1, 0, c.EINVAL),
        (c.CMD_BLOCK_STATUS, SIZE, 1, 0, c.EINVAL),
        (c.CMD_CACHE, SIZE, 1, 0, c.EINVAL),
        (c.CMD_READ, 0, 0, 0, c.EINVAL),
        (c.CMD_READ, 0, (32 << 20) + 1, 0, c.EOVERFLOW),
        (c.CMD_READ, 0, 1, 1 << 7, c.EINVAL),
        (c.CMD_READ, 0, 1, c.CMD_FLAG_NO_HOLE, c.EINVAL),
        (c.CMD_FLUSH, 1, 0, 0, c.EINVAL),
        (c.CMD_FLUSH, 0, 1, 0, c.EINVAL),
        (c.CMD_FLUSH, 0, 0, c.CMD_FLAG_FUA, 0),
        (c.CMD_BLOCK_STATUS, 0, 1, c.CMD_FLAG_DF, c.EINVAL),
        (c.CMD_BLOCK_STATUS, 0, 1, c.CMD_FLAG_REQ_ONE, 0),
        (c.CMD_WRITE_ZEROES, 0, 1, c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO | c.CMD_FLAG_FUA, 0),
        (c.CMD_WRITE_ZEROES, 0, 64 << 20, 0, c.ENOSPC),
        (8, 0, 0, 0, c.EINVAL),
        (0xFFFF, 0, 0, 0, c.EINVAL),
        (c.CMD_READ, 0, 1, c.CMD_FLAG_DF, 0),
    ],
)
def test_validation_errors(command: int, offset: int, length: int, flags: int, error: int) -> None:
    assert errors_of(tx(), req(command, offset, length, flags)) == [error]


def test_df_without_structured_and_block_status_without_context() -> None:
    assert errors_of(tx(structured=False), req(c.CMD_READ, 0, 1, c.CMD_FLAG_DF)) == [c.EINVAL]
    assert errors_of(tx(ctx=None), req(c.CMD_BLOCK_STATUS, 0, 1)) == [c.EINVAL]


def test_read_only_export_is_eperm() -> None:
    ro = ExportInfo(name="", size=SIZE, read_only=True)
    t = tx(export=ro)
    assert errors_of(t, req(c.CMD_WRITE, 0, 2, data=b"ab")) == [c.EPERM]
    assert errors_of(t, req(c.CMD_TRIM, 0, 2)) == [c.EPERM]
    assert errors_of(t, req(c.CMD_WRITE_ZEROES, 0, 2)) == [c.EPERM]
    assert errors_of(t, req(c.CMD_READ, 0, 2)) == [0]


def test_rejected_write_payload_is_consumed_and_connection_goes_on() -> None:
    t = tx()
    events = t.receive_data(req(c.CMD_WRITE, SIZE - 2, 4, data=b"abcd", cookie=1) + req(c.CMD_READ, 0, 8, cookie=2))
    assert [type(e) for e in events] == [Rejected, Request]
    assert events[0].error == c.ENOSPC and events[0].reply == replies.simple(1, c.ENOSPC)
    assert events[1].cookie == 2


def test_oversized_write_is_skipped_without_buffering() -> None:
    t = tx()
    length = (32 << 20) + 4096
    assert t.receive_data(req(c.CMD_WRITE, 0, length, cookie=3)) == []
    chunk = b"z" * (1 << 20)
    sent = 0
    while sent + len(chunk) <= length:
        assert t.receive_data(chunk) == []
        assert t.buffered == 0
        sent += len(chunk)
    events = t.receive_data(b"z" * (length - sent) + req(c.CMD_FLUSH, cookie=4))
    assert [e.cookie for e in events] == [3, 4]
    assert isinstance(events[0], Rejected) and events[0].error == c.EINVAL


def test_large_write_collected_once() -> None:
    t = tx()
    payload = bytes(range(256)) * 4096  # 1 MiB
    events = t.receive_data(req(c.CMD_WRITE, 0, len(payload), cookie=5) + payload[:1000])
    assert events == []
    assert t.buffered == len(payload)
    events = t.receive_data(payload[1000:] + req(c.CMD_READ, 0, 1, cookie=6))
    assert bytes(events[0].data) == payload and events[1].cookie == 6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 31), st.integers(0, 2 * SIZE), st.integers(0, 70000)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 100),
)
def test_any_request_stream_gets_one_event_per_request(reqs: list[tuple[int, int, int, int]], cut: int) -> None:
    """Whatever the commands, flags and ranges, each request yields exactly one event, in order, however the
    stream is split; valid requests are within the export."""
    t = tx()
    stream = b""
    for i, (cmd, flags, offset, length) in enumerate(reqs):
        if cmd == c.CMD_DISC:
            cmd = c.CMD_READ
        stream += req(cmd, offset, length, flags, cookie=i, data=b"\x01" * length if cmd == c.CMD_WRITE else b"")
    events = []
    for pos in range(0, len(stream), cut):
        events += t.receive_data(stream[pos : pos + cut])
    assert [e.cookie for e in events] == list(range(len(reqs)))
    for e in events:
        if isinstance(e, Request) and e.command != c.CMD_FLUSH:
            assert e.length > 0 and e.offset + e.length <= SIZE


# -- replies ---------------------------------------------------------------------------------------------------
def test_reply_bytes() -> None:
    assert replies.simple(5, c.EIO) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 5, 5)
    assert replies.read_header(True, 1, 100, 4) == struct.pack(
        ">IHHQIQ", c.STRUCTURED_REPLY_MAGIC, 1, c.REPLY_TYPE_OFFSET_DATA, 1, 12, 100
    )
    assert replies.read_header(False, 1, 100, 4) == replies.simple(1)
    err = replies.error(True, 2, c.CMD_READ, c.EINVAL, "bad")
    assert err == struct.pack(">IHHQIIH", c.STRUCTURED_REPLY_MAGIC, 1, c.REPLY_TYPE_ERROR, 2, 9, c.EINVAL, 3) + b"bad"
    assert replies.error(True, 2, c.CMD_WRITE, c.EINVAL) == replies.simple(2, c.EINVAL)
    bs = replies.block_status(3, 1, [(4096, 3), (100, 0)])
    assert bs == struct.pack(">IHHQII", c.STRUCTURED_REPLY_MAGIC, 1, 5, 3, 20, 1) + struct.pack(
        ">IIII", 4096, 3, 100, 0
    )


def test_clip_extents() -> None:
    ext = [Extent(0, 4096, 3), Extent(4096, 4096, 3), Extent(8192, 8192, 0)]
    assert replies.clip_extents(ext, 1000, 10000, False) == [(7192, 3), (2808, 0)]
    assert replies.clip_extents(ext, 1000, 10000, True) == [(7192, 3)]
    assert replies.clip_extents(ext, 5000, 10, True) == [(10, 3)]
    assert replies.clip_extents([], 0, 10, False) == [(10, 0)]
    assert replies.clip_extents([Extent(100, 10, 3)], 0, 200, False) == [(100, 0), (10, 3), (90, 0)]


def feed_buffered(t: Transmission, stream: bytes, cut: int) -> list:
    """Feed ``stream`` the way a BufferedProtocol transport does: recv_into get_buffer(), then buffer_updated."""
    events = []
    pos = 0
    while pos < len(stream):
        buf = t.get_buffer()
        n = min(len(buf), cut, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        events += t.buffer_updated(n)
    return events


def test_buffer_interface_receives_large_payload_in_place() -> None:
    allocated = []

    def allocate(n: int) -> bytearray:
        allocated.append(bytearray(n + 100))  # larger than asked, like a pooled buffer
        return allocated[-1]

    t = Transmission(Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO"), allocate)
    payload = bytes(range(256)) * 1024
    stream = req(c.CMD_WRITE, 0, len(payload), cookie=1, data=payload) + req(c.CMD_READ, 0, 1, cookie=2)
    head = t.get_buffer()
    head[:1000] = stream[:1000]
    assert t.buffer_updated(1000) == []
    inplace = t.get_buffer()
    assert len(inplace) == len(payload) - (1000 - 28)
    events = feed_buffered(t, stream[1000:], 50000)
    assert [e.cookie for e in events] == [1, 2]
    assert bytes(events[0].data) == payload and events[0].buffer is allocated[0]


def test_stream_min_leaves_a_large_plain_write_payload_on_the_stream() -> None:
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    t = Transmission(negotiated, stream_min=64 * 1024)
    payload = bytes(range(256)) * 1024
    small = req(c.CMD_WRITE, 0, 100, cookie=1, data=b"s" * 100)
    fua = req(c.CMD_WRITE, 0, len(payload), c.CMD_FLAG_FUA, cookie=2, data=payload[:5000])
    events = t.receive_data(small + fua)  # FUA: collected as usual, never streamed
    assert [type(e) for e in events] == [Request]
    events = t.receive_data(payload[5000:] + req(c.CMD_WRITE, 4096, len(payload), cookie=3, data=payload[:1000]))
    assert [type(e) for e in events] == [Request, PayloadFollows]
    follows = events[1]
    assert events[0].cookie == 2 and follows.request.cookie == 3
    assert bytes(follows.head) == payload[:1000] and follows.request.length == len(payload)
    assert len(t.get_buffer()) == FIRST_READ_AFTER_STREAM  # the next read takes little more than a header
    assert t.buffer_updated(0) == []  # a read that found nothing (EAGAIN) ...
    assert len(t.get_buffer()) == FIRST_READ_AFTER_STREAM  # ... leaves the next one short too
    # the caller took the rest off the stream itself; the parser goes on with the next header
    assert [e.cookie for e in t.receive_data(req(c.CMD_READ, 0, 512, cookie=4))] == [4]


def test_splice_limits_only_at_a_request_boundary_of_a_streaming_parser() -> None:
    """What the C splicer may take (``_batch.splice_writes``): the export's bounds and the streaming range, and
    nothing while the parser holds part of the stream."""
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    assert Transmission(negotiated).splice_limits() is None  # not streaming (e.g. TLS)
    t = Transmission(negotiated, stream_min=64 * 1024, stream_max=1 << 20)
    assert t.splice_limits() == (EXPORT.size, EXPORT.max_block, EXPORT.min_block - 1, 64 * 1024, 1 << 20)
    head = req(c.CMD_WRITE, 0, 4096, cookie=1, data=b"x" * 4096)
    assert t.receive_data(head[:20]) == []
    assert t.splice_limits() is None  # half a header held
    assert [e.cookie for e in t.receive_data(head[20:100])] == []
    assert t.splice_limits() is None  # a payload being received
    assert [e.cookie for e in t.receive_data(head[100:])] == [1]
    assert t.splice_limits() is not None
    bad = req(c.CMD_WRITE, SIZE, 70000, cookie=2, data=b"y" * 100)
    assert t.receive_data(bad) == []
    assert t.splice_limits() is None  # a rejected payload being skipped


def test_collect_takes_a_streamed_payload_back() -> None:
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    t = Transmission(negotiated, stream_min=64 * 1024)
    payload = bytes(range(256)) * 1024
    (follows,) = t.receive_data(req(c.CMD_WRITE, 0, len(payload), cookie=5, data=payload[:3000]))
    assert isinstance(follows, PayloadFollows)
    buffer = bytearray(len(payload))  # the caller's, paid for by the caller
    t.collect(follows, buffer)
    assert len(t.get_buffer()) == len(payload) - 3000  # the rest is received in place, not a short read
    events = feed_buffered(t, payload[3000:] + req(c.CMD_FLUSH, cookie=6), 70000)
    assert [(type(e), e.cookie) for e in events] == [(Request, 5), (Request, 6)]
    assert bytes(events[0].data) == payload and events[0].buffer is buffer


def test_a_streamed_write_needs_no_allocation_so_it_never_waits() -> None:
    # With allocate_alone the parser stops before a WRITE that needs a buffer; one it streams needs none, so
    # it comes out after the requests before it, and the allocator is never asked.
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    asked: list[int] = []

    def allocate(length: int) -> bytearray:
        asked.append(length)
        return bytearray(length)

    t = Transmission(negotiated, allocate, allocate_alone=True, stream_min=64 * 1024)
    stream = req(c.CMD_READ, 0, 512, cookie=1) + req(c.CMD_WRITE, 0, 128 * 1024, cookie=2, data=b"x" * 100)
    events = t.receive_data(stream)
    assert [type(e) for e in events] == [Request, PayloadFollows] and not t.waiting and asked == []


def test_a_write_longer_than_stream_max_gets_a_buffer() -> None:
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    t = Transmission(negotiated, lambda n: None, allocate_alone=True, stream_min=64 * 1024, stream_max=128 * 1024)
    assert t.receive_data(req(c.CMD_WRITE, 0, 256 * 1024, cookie=1, data=b"x" * 100)) == []
    assert t.waiting  # asked for a buffer (refused here), not streamed


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 300000)), min_size=1, max_size=6), st.integers(1, 70000))
def test_buffer_interface_matches_bytes_interface(reqs: list[tuple[int, int]], cut: int) -> None:
    stream = b""
    for i, (cmd, length) in enumerate(reqs):
        if cmd == c.CMD_DISC:
            cmd = c.CMD_WRITE
        data = bytes([i % 256]) * length if cmd == c.CMD_WRITE else b""
        stream += req(cmd, 0, length, 0, cookie=i, data=data)
    a = tx().receive_data(stream)
    b = feed_buffered(tx(), stream, cut)
    assert [(type(e), e.cookie) for e in a] == [(type(e), e.cookie) for e in b]
    for x, y in zip(a, b, strict=True):
        if isinstance(x, Request) and x.data is not None:
            assert bytes(x.data) == bytes(y.data)


def test_block_status_reply_is_capped_and_charged_its_largest_size() -> None:
    """A range with more extents than one reply may carry gets the first MAX_EXTENTS of them (the client asks
    again for the rest), so one BLOCK_STATUS reply never exceeds what the budget charges for it."""
    from cachemode.nbd.budget import cost

    count = c.MAX_EXTENTS + 10
    extents = [Extent(i * 512, 512, i % 2) for i in range(count)]
    out = replies.clip_extents(extents, 0, count * 512, req_one=False)
    assert len(out) == c.MAX_EXTENTS and all(length == 512 for length, _ in out)
    reply = replies.block_status(1, 1, out)
    assert len(reply) <= cost(c.CMD_BLOCK_STATUS, count * 512)


# -- runs of small READs (the C scanner) ---------------------------------------------------------------------
def expand(events: list) -> list:
    out = []
    for e in events:
        out += e.requests() if isinstance(e, ReadRun | WriteRun) else [e]
    return out


def same_events(a: list, b: list) -> bool:
    def key(e: object) -> tuple:
        if isinstance(e, Request):
            data = None if e.data is None else bytes(e.data)
            return (Request, e.command, e.flags, e.cookie, e.offset, e.length, data)
        return (type(e), getattr(e, "cookie", None), getattr(e, "reply", None))

    return [key(e) for e in a] == [key(e) for e in b]


@pytest.mark.skipif(scan_reads is None, reason="the C extension is not built")
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([c.CMD_READ] * 6 + [c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, 99]),
            st.sampled_from([0, 0, 0, c.CMD_FLAG_FUA, c.CMD_FLAG_DF, 1 << 9]),
            st.sampled_from([0, 4096, 512, 1, SIZE - 4096, SIZE, SIZE + 4096, 1 << 63]),
            st.sampled_from([4096, 512, 1, 0, 65535, 65536, 70000, SIZE, c.MAX_PAYLOAD + 1, 1 << 31]),
        ),
        min_size=1,
        max_size=24,
    ),
    st.integers(1, 200),
    st.booleans(),
    st.sampled_from([1, 512]),
    st.sampled_from([c.MAX_PAYLOAD, 4096]),
)
def test_read_and_write_runs_are_exactly_the_requests_the_core_accepts(
    reqs: list[tuple[int, int, int, int]], cut: int, structured: bool, min_block: int, max_block: int
) -> None:
    """With ``batch_reads``/``batch_writes`` the parser hands out runs of plain READs and of complete plain WRITEs
    shorter than those as ReadRun/WriteRun events; expanded into Requests, the events are exactly those of the
    parser without them -- whatever the commands, flags, ranges (invalid ones included: the C scanners leave
    those to the core's validation), alignment and cuts."""
    export = ExportInfo(name="disk", size=SIZE, min_block=min_block, max_block=max_block)
    stream = b""
    for i, (cmd, flags, offset, length) in enumerate(reqs):
        if cmd == c.CMD_WRITE:
            length = min(length, 5000)
        stream += req(cmd, offset, length, flags, cookie=i, data=b"\x02" * length if cmd == c.CMD_WRITE else b"")
    negotiated = Negotiated(export, structured, 1, export.transmission_flags(structured), True, "GO")
    plain = Transmission(negotiated).receive_data(stream)
    batched_tx = Transmission(negotiated, batch_reads=65536, batch_writes=4097)
    batched = []
    for pos in range(0, len(stream), cut):
        batched += batched_tx.receive_data(stream[pos : pos + cut])
    assert same_events(plain, expand(batched))
    for e in batched:
        if isinstance(e, ReadRun | WriteRun):
            limit = 65536 if isinstance(e, ReadRun) else 4097
            assert len(e) >= 1
            assert all(r.length < limit and r.flags == 0 and r.offset + r.length <= SIZE for r in e.requests())
            assert all(not (r.offset | r.length) % min_block for r in e.requests())


@pytest.mark.skipif(scan_reads is None, reason="the C extension is not built")
def test_a_read_run_stops_at_the_first_other_request() -> None:
    t = Transmission(Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO"), batch_reads=65536)
    stream = b"".join(req(c.CMD_READ, 4096 * i, 4096, cookie=i) for i in range(5))
    stream += req(c.CMD_FLUSH, cookie=5) + req(c.CMD_READ, 0, 65536, cookie=6) + req(c.CMD_READ, 0, 512, cookie=7)
    events = t.receive_data(stream)
    assert [type(e) for e in events] == [ReadRun, Request, Request, ReadRun]
    assert [(r.cookie, r.offset, r.length) for r in events[0].requests()] == [(i, 4096 * i, 4096) for i in range(5)]
    assert events[0].request(3).cookie == 3 and events[0].requests(4)[0].cookie == 4
    assert events[2].length == 65536  # not shorter than batch_reads: a Request of its own


@pytest.mark.skipif(scan_reads is None, reason="the C extension is not built")
def test_a_write_run_takes_only_complete_payloads_and_not_on_a_read_only_export() -> None:
    negotiated = Negotiated(EXPORT, True, 1, EXPORT.transmission_flags(True), True, "GO")
    t = Transmission(negotiated, batch_writes=8192)
    stream = b"".join(req(c.CMD_WRITE, 512 * i, 100 + i, cookie=i, data=bytes([i]) * (100 + i)) for i in range(4))
    events = t.receive_data(stream + req(c.CMD_WRITE, 0, 5000, cookie=9, data=b"z" * 10))
    assert [type(e) for e in events] == [WriteRun]  # the fifth one's payload is still to come
    assert [(r.cookie, r.offset, bytes(r.data)) for r in events[0].requests()] == [
        (i, 512 * i, bytes([i]) * (100 + i)) for i in range(4)
    ]
    (last,) = t.receive_data(b"z" * 4990)
    assert isinstance(last, Request) and bytes(last.data) == b"z" * 5000
    ro = ExportInfo(name="disk", size=SIZE, read_only=True)
    t = Transmission(Negotiated(ro, True, 1, ro.transmission_flags(True), True, "GO"), batch_writes=8192)
    assert [type(e) for e in t.receive_data(stream)] == [Rejected] * 4
