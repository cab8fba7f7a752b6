"""NBD wire constants (NetworkBlockDevice/nbd ``doc/proto.md``). All integers are big-endian."""

from __future__ import annotations

import errno as _errno

# -- magic numbers ------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, u16) and client flags (u32) ---------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- options --------------------------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# -- option reply types ---------------------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# -- info types -----------------------------------------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (u16) ---------------------------------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

TRANSMISSION_FLAG_NAMES = {
    TF_HAS_FLAGS: "HAS_FLAGS",
    TF_READ_ONLY: "READ_ONLY",
    TF_SEND_FLUSH: "SEND_FLUSH",
    TF_SEND_FUA: "SEND_FUA",
    TF_ROTATIONAL: "ROTATIONAL",
    TF_SEND_TRIM: "SEND_TRIM",
    TF_SEND_WRITE_ZEROES: "SEND_WRITE_ZEROES",
    TF_SEND_DF: "SEND_DF",
    TF_CAN_MULTI_CONN: "CAN_MULTI_CONN",
    TF_SEND_RESIZE: "SEND_RESIZE",
    TF_SEND_CACHE: "SEND_CACHE",
    TF_SEND_FAST_ZERO: "SEND_FAST_ZERO",
}

# -- commands and command flags -------------------------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured reply chunks ----------------------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- wire error numbers (the protocol's own values, not the host's errno) -----------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {
    0: "OK",
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}


def wire_errno(host_errno: int | None) -> int:
    """Map a host errno to the NBD error the spec allows (anything unknown becomes EIO)."""
    if host_errno is None:
        return EIO
    if host_errno in (_errno.EDQUOT, _errno.EFBIG, _errno.ENOSPC):
        return ENOSPC
    return {
        _errno.EPERM: EPERM,
        _errno.EACCES: EPERM,
        _errno.EROFS: EPERM,
        _errno.EIO: EIO,
        _errno.ENOMEM: ENOMEM,
        _errno.EINVAL: EINVAL,
        _errno.EOVERFLOW: EOVERFLOW,
        _errno.ENOTSUP: ENOTSUP,
        _errno.EOPNOTSUPP: ENOTSUP,
        _errno.ESHUTDOWN: ESHUTDOWN,
    }.get(host_errno, EIO)


# -- limits ---------------------------------------------------------------------------------------------------
MAX_PAYLOAD = 32 * 1024 * 1024
"""The largest READ/WRITE payload accepted (and advertised as the maximum block size)."""
MAX_STRING = 4096
"""Export names, queries and messages longer than this are refused (the spec's MUST limit)."""
MAX_OPTION_DATA = 64 * 1024
"""Option payloads beyond this are skipped unread and answered with ERR_TOO_BIG."""
MAX_EXTENTS = 1 << 17
"""The most block-status descriptors in one reply: 1 MiB of them, as qemu-nbd (NBD_MAX_BLOCK_STATUS_EXTENTS); a
client asks again for the rest of its range. It bounds what one BLOCK_STATUS reply makes the server hold."""
EXPORT_PADDING = 124
