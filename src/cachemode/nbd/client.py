"""A minimal blocking NBD client: enough for the demo's session and for tests that need raw control.

It speaks fixed newstyle with GO (structured replies and ``base:allocation`` when asked) and sends one request
at a time, or several with :meth:`Client.send_request` / :meth:`Client.read_reply`. Real-client testing is
done with qemu-io, nbdinfo, nbdsh, nbdcopy and fio; this exists so the demo needs nothing but Python.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

from cachemode.nbd import constants as c


class ClientError(Exception):
    """The server answered with an error (``.error`` holds the NBD errno) or broke the protocol."""

    def __init__(self, message: str, error: int = 0) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)
    message: str = ""


class Client:
    """Connect to ``host:port`` (or a unix ``socket_path``) and negotiate with NBD_OPT_GO."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 10809,
        *,
        socket_path: str | None = None,
        export: str = "",
        structured: bool = True,
        meta_context: bool = True,
        timeout: float = 30.0,
    ) -> None:
        if socket_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(socket_path)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.context_id: int | None = None
        self.size = 0
        self.flags = 0
        self.block_sizes: tuple[int, int, int] | None = None
        self._cookie = 0
        self._handshake(export, structured, meta_context)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ClientError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            if magic != c.OPTION_REPLY_MAGIC or opt != option:
                raise ClientError("bad option reply")
            payload = self._recv(length)
            replies.append((rtype, payload))
            if rtype == c.REP_ACK or rtype & c.REP_FLAG_ERROR:
                return replies

    def _handshake(self, export: str, structured: bool, meta_context: bool) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != c.NBDMAGIC or opt != c.IHAVEOPT:
            raise ClientError("not an NBD newstyle server")
        cflags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if hflags & c.FLAG_NO_ZEROES else 0)
        self.sock.sendall(struct.pack(">I", cflags))
        if structured and self._option(c.OPT_STRUCTURED_REPLY)[-1][0] == c.REP_ACK:
            self.structured = True
            if meta_context:
                name = export.encode()
                query = b"base:allocation"
                data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
                for rtype, payload in self._option(c.OPT_SET_META_CONTEXT, data):
                    if rtype == c.REP_META_CONTEXT:
                        self.context_id = struct.unpack_from(">I", payload)[0]
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, c.INFO_BLOCK_SIZE)
        for rtype, payload in self._option(c.OPT_GO, data):
            if rtype & c.REP_FLAG_ERROR:
                raise ClientError(f"GO refused: {payload.decode(errors='replace')}")
            if rtype == c.REP_INFO:
                (info,) = struct.unpack_from(">H", payload)
                if info == c.INFO_EXPORT:
                    _, self.size, self.flags = struct.unpack(">HQH", payload)
                elif info == c.INFO_BLOCK_SIZE:
                    self.block_sizes = struct.unpack(">HIII", payload)[1:]

    # -- requests ---------------------------------------------------------------------------------------------
    def send_request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> int:
        self._cookie += 1
        header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, command, self._cookie, offset, length)
        self.sock.sendall(header + data)
        return self._cookie

    def read_reply(self, read_length: int | None = None) -> Reply:
        """Read one complete reply; ``read_length`` is needed for a simple READ reply's data."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == c.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv(12))
            data = self._recv(read_length) if read_length and not error else b""
            return Reply(cookie, error, data)
        if magic != c.STRUCTURED_REPLY_MAGIC:
            raise ClientError(f"bad reply magic {magic:#x}")
        reply: Reply | None = None
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self._recv(16))
            payload = self._recv(length)
            reply = reply or Reply(cookie)
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                reply.data += payload[8:]
            elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
                reply.data += bytes(struct.unpack_from(">QI", payload)[1])
            elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
                body = payload[4:]
                reply.extents += [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]
            elif rtype & (1 << 15):
                reply.error, mlen = struct.unpack_from(">IH", payload)
                reply.message = payload[6 : 6 + mlen].decode(errors="replace")
            if flags & c.REPLY_FLAG_DONE:
                return reply
            (magic,) = struct.unpack(">I", self._recv(4))

    def _call(self, command: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> Reply:
        cookie = self.send_request(command, offset, length, flags, data)
        reply = self.read_reply(length if command == c.CMD_READ else None)
        if reply.cookie != cookie:
            raise ClientError("reply for an unexpected cookie")
        if reply.error:
            name = c.ERROR_NAMES.get(reply.error, str(reply.error))
            raise ClientError(f"{c.COMMAND_NAMES.get(command)} failed: {name} {reply.message}".strip(), reply.error)
        return reply

    def pread(self, length: int, offset: int, flags: int = 0) -> bytes:
        return self._call(c.CMD_READ, offset, length, flags).data

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> None:
        self._call(c.CMD_WRITE, offset, len(data), flags, data)

    def flush(self) -> None:
        self._call(c.CMD_FLUSH)

    def trim(self, length: int, offset: int, flags: int = 0) -> None:
        self._call(c.CMD_TRIM, offset, length, flags)

    def zero(self, length: int, offset: int, flags: int = 0) -> None:
        self._call(c.CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
        return self._call(c.CMD_BLOCK_STATUS, offset, length, flags).extents

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send_request(c.CMD_DISC)
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
