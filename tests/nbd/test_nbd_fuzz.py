"""A bounded fuzz of the sans-IO core: random bytes and mutated valid streams, fed in random pieces.

The handshake may raise only :class:`ProtocolError` (and is CLOSED after it); transmission raises nothing.
Every byte either sends must be a well-formed reply, every event must be one the protocol allows, and how the
bytes were cut must not change what comes out.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachemode.nbd import constants as c
from cachemode.nbd import validate
from cachemode.nbd.export import ExportInfo
from cachemode.nbd.handshake import Aborted, Handshake, OptionSeen, ProtocolError, Ready, State, greeting
from cachemode.nbd.replies import SIMPLE_HEADER_SIZE
from cachemode.nbd.requests import Disconnect, Rejected, Request, Transmission, Violation

SIZE = 1 << 20
EXPORTS = [
    ExportInfo(name="disk", size=SIZE),
    ExportInfo(name="", size=SIZE, read_only=True, write_cache=False),
    ExportInfo(name="aligned", size=SIZE, min_block=512, pref_block=4096, max_block=64 * 1024),
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REQUEST_ERRORS = {c.EPERM, c.EINVAL, c.ENOSPC, c.EOVERFLOW}


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def name_and_infos(name: bytes, infos: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta(name: bytes, queries: list[bytes]) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


names = st.sampled_from([b"", b"disk", b"aligned", b"nope", b"\xff\xfe"])
options = st.one_of(
    st.builds(lambda: option(c.OPT_STRUCTURED_REPLY)),
    st.builds(lambda: option(c.OPT_LIST)),
    st.builds(lambda n, i: option(c.OPT_INFO, name_and_infos(n, i)), names, st.lists(st.integers(0, 5), max_size=4)),
    st.builds(
        lambda o, n, q: option(o, meta(n, q)),
        st.sampled_from([c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT]),
        names,
        st.lists(st.sampled_from([b"base:", b"base:allocation", b"qemu:dirty"]), max_size=3),
    ),
    st.builds(lambda o, d: option(o, d), st.integers(0, 20), st.binary(max_size=40)),
)
endings = st.one_of(
    st.builds(lambda n, i: option(c.OPT_GO, name_and_infos(n, i)), names, st.lists(st.integers(0, 3), max_size=3)),
    st.builds(lambda n: option(c.OPT_EXPORT_NAME, n), names),
    st.builds(lambda: option(c.OPT_ABORT)),
)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    """``stream`` with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


@st.composite
def handshake_streams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    flags = struct.pack(">I", draw(st.sampled_from([0, 1, 3, 2, 7])))
    valid = flags + b"".join(draw(st.lists(options, max_size=6))) + draw(endings)
    return draw(mutated(valid))


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


INFO_LENGTHS = {c.INFO_EXPORT: 12, c.INFO_BLOCK_SIZE: 14}


def check_option_replies(out: bytes, export: ExportInfo, no_zeroes: bool, via_export_name: bool) -> int:
    """``out`` is a run of well-formed option replies, then (after EXPORT_NAME) the export's size and flags.
    Returns how many final replies (ACK or an error) it holds: one per option answered."""
    pos = 0
    tail = 0
    finals = 0
    if via_export_name:
        tail = 10 if no_zeroes else 10 + c.EXPORT_PADDING
    body = len(out) - tail
    while pos < body:
        assert body - pos >= 20, out[pos:]
        magic, _, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        assert rtype in (c.REP_ACK, c.REP_SERVER, c.REP_INFO, c.REP_META_CONTEXT) or rtype & (1 << 31)
        if rtype == c.REP_ACK:
            assert length == 0
        if rtype == c.REP_ACK or rtype & (1 << 31):
            finals += 1
        if rtype == c.REP_INFO:
            (info,) = struct.unpack_from(">H", out, pos + 20)
            assert length == INFO_LENGTHS.get(info, length)
        pos += 20 + length
        assert pos <= body
    if via_export_name:
        size, _ = struct.unpack_from(">QH", out, body)
        assert size == export.size and out[body + 10 :] == bytes(tail - 10)
    return finals


@FUZZ
@given(st.sampled_from(EXPORTS), st.booleans(), handshake_streams(), st.lists(st.integers(0, 1000), max_size=5))
def test_handshake_fuzz(export: ExportInfo, offer_no_zeroes: bool, stream: bytes, points: list[int]) -> None:
    hs = Handshake(export, offer_no_zeroes=offer_no_zeroes)
    assert hs.data_to_send() == greeting(offer_no_zeroes)
    out = b""
    events: list[object] = []
    failed = False
    for piece in cuts(stream, points):
        try:
            events += hs.receive_data(piece)
        except ProtocolError:
            failed = True  # the transport drops the connection: nothing more is sent
            break
        out += hs.data_to_send()
        if hs.state in (State.TRANSMISSION, State.CLOSED):
            break
    assert all(isinstance(e, Ready | Aborted | OptionSeen) for e in events)
    if failed:
        assert hs.state is State.CLOSED
    ends = [e for e in events if isinstance(e, Ready | Aborted)]
    assert len(ends) <= 1 and (not ends or events[-1] is ends[0])
    if ends and isinstance(ends[0], Ready):
        assert hs.state is State.TRANSMISSION
    if ends and isinstance(ends[0], Aborted):
        assert hs.state is State.CLOSED
    via_export_name = bool(ends) and isinstance(ends[0], Ready) and ends[0].negotiated.via == "EXPORT_NAME"
    no_zeroes = via_export_name and ends[0].negotiated.no_zeroes  # type: ignore[union-attr]
    finals = check_option_replies(out, export, no_zeroes, via_export_name)
    answered = [e for e in events if isinstance(e, OptionSeen) and e.option != -1]
    assert finals == len(answered) + (len(ends) - via_export_name)  # GO and ABORT are acknowledged too


def request(cmd: int, flags: int, cookie: int, offset: int, length: int, payload: bool) -> bytes:
    data = bytes([cookie % 256]) * length if cmd == c.CMD_WRITE and payload and length <= 70000 else b""
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


requests_ = st.builds(
    request,
    st.sampled_from([c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES, 7, 9]),
    st.sampled_from([0, c.CMD_FLAG_FUA, c.CMD_FLAG_DF, c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO, 1 << 9]),
    st.integers(0, 1 << 16),
    st.sampled_from([0, 1, 512, 4096, SIZE - 512, SIZE, 1 << 40]),
    st.sampled_from([0, 1, 511, 512, 4096, 65536, 70000, c.MAX_PAYLOAD + 1]),
    st.booleans(),
)


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    valid = b"".join(draw(st.lists(requests_, max_size=8)))
    if draw(st.booleans()):
        valid += struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0)
    return draw(mutated(valid))


def check_events(events: list[object], export: ExportInfo, structured: bool) -> None:
    ends = [i for i, e in enumerate(events) if isinstance(e, Disconnect | Violation)]
    assert ends in ([], [len(events) - 1])  # at most one, and nothing after it
    for ev in events:
        if isinstance(ev, Request):
            assert validate.check(ev.command, ev.flags, ev.offset, ev.length, export, structured, 1) is None
            if ev.command == c.CMD_WRITE:
                assert len(bytes(ev.data)) == ev.length  # type: ignore[arg-type]
        elif isinstance(ev, Rejected):
            assert ev.error in REQUEST_ERRORS
            reply = ev.reply
            if structured and ev.command in (c.CMD_READ, c.CMD_BLOCK_STATUS):
                magic, flags, rtype, cookie, length, error, mlen = struct.unpack_from(">IHHQIIH", reply)
                assert (magic, flags, rtype) == (c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR)
                assert length == len(reply) - 20 == 6 + mlen and error == ev.error
            else:
                assert len(reply) == SIMPLE_HEADER_SIZE
                magic, error, cookie = struct.unpack(">IIQ", reply)
                assert magic == c.SIMPLE_REPLY_MAGIC and error == ev.error
            assert cookie == ev.cookie


def describe(events: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for ev in events:
        if isinstance(ev, Request):
            data = bytes(ev.data) if ev.data is not None else None  # type: ignore[arg-type]
            out.append(("req", ev.command, ev.flags, ev.cookie, ev.offset, ev.length, data))
        elif isinstance(ev, Rejected):
            out.append(("rej", ev.cookie, ev.reply))
        else:
            out.append((type(ev).__name__,))
    return out


@FUZZ
@given(
    st.sampled_from(EXPORTS),
    st.booleans(),
    request_streams(),
    st.lists(st.integers(0, 100000), max_size=6),
    st.lists(st.booleans(), max_size=6),
)
def test_transmission_fuzz(
    export: ExportInfo, structured: bool, stream: bytes, points: list[int], refusals: list[bool]
) -> None:
    """Whole stream at once, in pieces through the bytes interface, and in pieces through the buffer interface
    with an allocator that sometimes refuses: never an exception, only allowed events, the same ones."""
    from cachemode.nbd.handshake import Negotiated

    negotiated = Negotiated(export, structured, 1, export.transmission_flags(structured), True, "GO")
    whole = Transmission(negotiated).receive_data(stream)
    check_events(whole, export, structured)

    pieces = Transmission(negotiated)
    split = [e for piece in cuts(stream, points) for e in pieces.receive_data(piece)]
    assert describe(split) == describe(whole)
    assert pieces.buffered <= export.max_block + 28 + len(stream)

    answers = iter(refusals)

    def allocate(n: int) -> bytearray | None:
        return None if next(answers, False) else bytearray(n)

    buffered = Transmission(negotiated, allocate, allocate_alone=True)
    events: list[object] = []
    for piece in cuts(stream, points):
        view = memoryview(piece)
        while len(view):
            if buffered.waiting:
                events += buffered.resume()
                continue
            buf = buffered.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            events += buffered.buffer_updated(n)
        while buffered.waiting:
            events += buffered.resume()
    assert describe(events) == describe(whole)
