"""Reply builders: each returns the exact bytes for one reply (or reply header).

Simple replies are used for every command except READ and BLOCK_STATUS once structured replies are
negotiated: the spec allows that, and it is what nbdkit does for commands without a payload.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cachemode.nbd import constants as c

_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")
_DESCRIPTOR = struct.Struct(">II")

SIMPLE_HEADER_SIZE = _SIMPLE.size
DATA_CHUNK_HEADER_SIZE = _DATA_CHUNK.size


def simple(cookie: int, error: int = 0) -> bytes:
    """A 16-byte simple reply (a successful READ's data follows it)."""
    return _SIMPLE.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def simple_into(buf: bytearray | memoryview, at: int, cookie: int) -> None:
    """Write a successful :func:`simple` reply into ``buf`` at ``at``."""
    _SIMPLE.pack_into(buf, at, c.SIMPLE_REPLY_MAGIC, 0, cookie)


def read_header(structured: bool, cookie: int, offset: int, length: int) -> bytes:
    """What precedes ``length`` bytes of READ data: a simple reply, or one OFFSET_DATA chunk with DONE."""
    if structured:
        return _DATA_CHUNK.pack(
            c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset
        )
    return _SIMPLE.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie)


def read_header_size(structured: bool) -> int:
    """The length of :func:`read_header`'s result."""
    return _DATA_CHUNK.size if structured else _SIMPLE.size


def read_header_into(
    buf: bytearray | memoryview, structured: bool, cookie: int, offset: int, length: int, at: int = 0
) -> None:
    """Write :func:`read_header` into ``buf`` at ``at``, so a small READ reply is one buffer, not a join."""
    if structured:
        _DATA_CHUNK.pack_into(
            buf, at, c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset
        )
    else:
        _SIMPLE.pack_into(buf, at, c.SIMPLE_REPLY_MAGIC, 0, cookie)


def structured_done(cookie: int) -> bytes:
    """A NONE chunk with DONE: success with no payload."""
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, cookie, 0)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    """An ERROR chunk with DONE."""
    msg = message.encode()[: c.MAX_STRING]
    return (
        _ERROR_CHUNK.pack(
            c.STRUCTURED_REPLY_MAGIC,
            c.REPLY_FLAG_DONE,
            c.REPLY_TYPE_ERROR,
            cookie,
            6 + len(msg),
            error,
            len(msg),
        )
        + msg
    )


def error(structured: bool, cookie: int, command: int, error: int, message: str = "") -> bytes:
    """The error reply for ``command``: structured for READ and BLOCK_STATUS when negotiated, else simple."""
    if structured and command in (c.CMD_READ, c.CMD_BLOCK_STATUS):
        return structured_error(cookie, error, message)
    return simple(cookie, error)


def block_status(cookie: int, context_id: int, extents: Iterable[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk with DONE: ``extents`` as (length, flags) pairs, none empty."""
    body = bytearray(struct.pack(">I", context_id))
    for length, flags in extents:
        body += _DESCRIPTOR.pack(length, flags)
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


def clip_extents(extents: Iterable[object], offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
    """Turn disk extents (``.offset``, ``.length``, ``.flags``) into descriptors for ``[offset, offset+length)``.

    Extents are clipped to the request (never empty, never past its end), merged when adjacent ones share
    flags, capped at :data:`constants.MAX_EXTENTS`, and cut to one with ``req_one``. A gap in what the disk
    reported is filled with flags 0 ("allocated data"), which is always a safe answer.
    """
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    for ext in extents:
        e_off = ext.offset  # type: ignore[attr-defined]
        e_end = e_off + ext.length  # type: ignore[attr-defined]
        flags = ext.flags & 3  # type: ignore[attr-defined]
        if e_end <= pos:
            continue
        if e_off > pos:
            gap_end = min(e_off, end)
            out.append((gap_end - pos, 0))
            pos = gap_end
            if pos >= end:
                break
        stop = min(e_end, end)
        if stop > pos:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                out.append((stop - pos, flags))
            pos = stop
        if pos >= end or (req_one and len(out) > 1):
            break
    if not out:
        out.append((length, 0))
    elif pos < end and not req_one:
        out.append((end - pos, 0))
    if req_one:
        out = out[:1]
    return out[: c.MAX_EXTENTS]


def error_of(exc: BaseException, command: int) -> int:
    """The NBD error for a failed disk call (EINVAL from a write means ENOSPC on the wire, as qemu-nbd says)."""
    host = getattr(exc, "errno", None)
    error = c.wire_errno(host)
    if error == c.EINVAL and command in (c.CMD_WRITE, c.CMD_WRITE_ZEROES):
        error = c.ENOSPC
    return error
