"""Request validation against what the export advertised: the error a bad request gets, or None.

The rules follow the spec's error table (and nbdkit's ``validate_request`` as a checklist): an unknown
command or an unknown or inapplicable flag is EINVAL; a write-type command on a read-only export EPERM; READ,
TRIM, CACHE or BLOCK_STATUS past the end EINVAL, WRITE or WRITE_ZEROES past the end ENOSPC; a READ above the
maximum payload EOVERFLOW, a WRITE above it EINVAL (its payload is skipped, never buffered); FLUSH with a
non-zero offset or length EINVAL; a zero length EINVAL (the spec leaves it open; nbdkit does the same).

FUA is accepted on every command in every mode, as the spec requires once SEND_FUA is advertised. When it is
not advertised (writethrough, directsync, or the write cache off) every write is durable before its reply
anyway, so a client that sets FUA regardless -- like one that sends FLUSH regardless -- loses nothing by
being answered with success.
"""

from __future__ import annotations

from cachemode.nbd import constants as c
from cachemode.nbd.export import ExportInfo

KNOWN_FLAGS = c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_DF | c.CMD_FLAG_REQ_ONE | c.CMD_FLAG_FAST_ZERO

_WRITE_TYPE = frozenset((c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES))


def allowed_flags(command: int, export: ExportInfo, structured: bool) -> int:
    """The command flags valid on ``command`` for this export and negotiation."""
    flags = c.CMD_FLAG_FUA
    if command == c.CMD_READ and structured:
        flags |= c.CMD_FLAG_DF
    elif command == c.CMD_WRITE_ZEROES:
        flags |= c.CMD_FLAG_NO_HOLE
        if export.can_fast_zero:
            flags |= c.CMD_FLAG_FAST_ZERO
    elif command == c.CMD_BLOCK_STATUS:
        flags |= c.CMD_FLAG_REQ_ONE
    return flags


def check(
    command: int,
    flags: int,
    offset: int,
    length: int,
    export: ExportInfo,
    structured: bool,
    meta_context_id: int | None,
) -> tuple[int, str] | None:
    """Return ``(nbd_errno, message)`` for a request that must be refused, or None when it is valid."""
    name = c.COMMAND_NAMES.get(command)
    if name is None or command == c.CMD_DISC:
        return c.EINVAL, f"unknown command {command}"
    bad = flags & ~allowed_flags(command, export, structured)
    if bad:
        return c.EINVAL, f"{name}: unknown or inapplicable flags {bad:#x}"
    if command == c.CMD_FLUSH:
        if offset or length:
            return c.EINVAL, "FLUSH with non-zero offset or length"
        return None
    if command in _WRITE_TYPE and export.read_only:
        return c.EPERM, f"{name} on a read-only export"
    if command == c.CMD_TRIM and not export.can_trim:
        return c.EINVAL, "TRIM not supported"
    if command == c.CMD_WRITE_ZEROES and not export.can_zero:
        return c.EINVAL, "WRITE_ZEROES not supported"
    if command == c.CMD_CACHE and not export.can_cache:
        return c.EINVAL, "CACHE not supported"
    if command == c.CMD_BLOCK_STATUS and meta_context_id is None:
        return c.EINVAL, "BLOCK_STATUS without a negotiated metadata context"
    if length == 0:
        return c.EINVAL, f"{name} with zero length"
    if length > export.max_block:
        if command == c.CMD_READ:
            return c.EOVERFLOW, f"READ of {length} bytes exceeds the maximum payload {export.max_block}"
        if command == c.CMD_WRITE:
            return c.EINVAL, f"WRITE of {length} bytes exceeds the maximum payload {export.max_block}"
    if offset + length > export.size:
        if command in (c.CMD_WRITE, c.CMD_WRITE_ZEROES):
            return c.ENOSPC, f"{name} past the end of the export"
        return c.EINVAL, f"{name} past the end of the export"
    minimum = export.min_block
    if minimum > 1 and (offset % minimum or length % minimum) and command != c.CMD_BLOCK_STATUS:
        return c.EINVAL, f"{name} not aligned to the minimum block size {minimum}"
    return None
