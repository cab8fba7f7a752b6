"""The transmission phase as a sans-IO parser: request bytes in, typed events out.

    tx = Transmission(negotiated)
    for event in tx.receive_data(chunk):
        match event:
            case Request(): ...        # valid: dispatch it to the disk, build the reply with ``replies``
            case Rejected(): ...       # invalid: send ``event.reply`` (a WRITE's payload is already skipped)
            case PayloadFollows(): ... # only with stream_min: a large WRITE whose rest the caller reads
            case ReadRun(): ...        # only with batch_reads: consecutive small plain READs, packed
            case WriteRun(): ...       # only with batch_writes: consecutive small plain WRITEs, packed
            case Disconnect(): ...     # NBD_CMD_DISC: finish in-flight requests, then close
            case Violation(): ...      # bad request magic: finish what came before it, then close

A bad request magic ends the stream (it cannot be resynchronised): the requests parsed before it are returned
as usual, followed by one :class:`Violation`, and the parser ignores everything after. So the outcome does
not depend on how TCP cut the bytes: requests before the bad header are executed and answered, then the
connection closes. The parser buffers at most one request header plus one WRITE payload (<= the maximum
payload, 32 MiB); a rejected WRITE's payload is counted off as it arrives and never held, whatever length the
header claims. The payload buffer comes from ``allocate``, which may refuse (return None) while the transport
has no memory to spare: the parser then keeps the header, sets :attr:`Transmission.waiting`, and parses on
when :meth:`Transmission.resume` is called.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cachemode.nbd import constants as c
from cachemode.nbd import replies, validate
from cachemode.nbd._batch import scan_reads, scan_writes
from cachemode.nbd.handshake import Negotiated

_REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = _REQUEST.size  # 28


class Request:
    """A valid request. ``data`` is the WRITE payload (bytes-like), else None; ``buffer`` is the object that
    holds it when the parser allocated one for it (see ``allocate``), so the server may reuse it."""

    __slots__ = ("buffer", "command", "cookie", "data", "flags", "length", "offset")

    def __init__(self, command: int, flags: int, cookie: int, offset: int, length: int, data: object = None) -> None:
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data = data
        self.buffer: object = None

    def __repr__(self) -> str:
        name = c.COMMAND_NAMES.get(self.command, str(self.command))
        return f"Request({name}, flags={self.flags:#x}, cookie={self.cookie}, {self.offset}+{self.length})"


class Rejected:
    """A request refused by validation; ``reply`` is the complete error reply to send."""

    __slots__ = ("command", "cookie", "error", "message", "reply")

    def __init__(self, command: int, cookie: int, error: int, message: str, reply: bytes) -> None:
        self.command = command
        self.cookie = cookie
        self.error = error
        self.message = message
        self.reply = reply

    def __repr__(self) -> str:
        return f"Rejected({c.ERROR_NAMES.get(self.error, self.error)}, cookie={self.cookie}, {self.message!r})"


class PayloadFollows:
    """A valid WRITE whose payload the parser leaves on the stream (see ``Transmission(stream_min=...)``).

    ``head`` holds the payload bytes already received; the next ``length - len(head)`` bytes of the stream
    are the rest. The caller must consume exactly those (e.g. splice them from the socket into the image)
    before it feeds the parser again; the parser then expects the next request header."""

    __slots__ = ("head", "request")

    def __init__(self, request: Request, head: bytes | memoryview) -> None:
        self.request = request
        self.head = head

    def __repr__(self) -> str:
        return f"PayloadFollows({self.request!r}, {len(self.head)} received)"


class ReadRun:
    """Consecutive plain READs (no flags) shorter than ``Transmission(batch_reads=...)``, each valid: ``entries``
    packs (cookie, offset, length) as native unsigned 64-bit triples, for a transport that serves them in one
    call (``cachemode.nbd._batch.read_batch``); :meth:`requests` turns them into :class:`Request` events."""

    __slots__ = ("entries",)

    def __init__(self, entries: bytes) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries) // _ENTRY.size

    def request(self, index: int) -> Request:
        """The ``index``-th READ as a :class:`Request`."""
        cookie, offset, length = _ENTRY.unpack_from(self.entries, index * _ENTRY.size)
        return Request(c.CMD_READ, 0, cookie, offset, length)

    def requests(self, start: int = 0) -> list[Request]:
        """The READs from the ``start``-th on, as :class:`Request` events."""
        return [
            Request(c.CMD_READ, 0, cookie, offset, length)
            for cookie, offset, length in _ENTRY.iter_unpack(memoryview(self.entries)[start * _ENTRY.size :])
        ]

    def __repr__(self) -> str:
        return f"ReadRun({len(self)} READs)"


class WriteRun:
    """Consecutive plain WRITEs (no flags) shorter than ``Transmission(batch_writes=...)``, each valid and with
    its whole payload: ``entries`` packs (cookie, offset, length, start of the payload in ``payload``) as native
    unsigned 64-bit quadruples; ``payload`` holds the run's bytes from its first header on. For a transport
    that writes them in one call (``cachemode.nbd._batch.write_batch``); :meth:`requests` turns them into
    :class:`Request` events."""

    __slots__ = ("entries", "payload")

    def __init__(self, entries: bytes, payload: bytes | memoryview) -> None:
        self.entries = entries
        self.payload = payload

    def __len__(self) -> int:
        return len(self.entries) // _WRITE_ENTRY.size

    def request(self, index: int) -> Request:
        """The ``index``-th WRITE as a :class:`Request`."""
        cookie, offset, length, start = _WRITE_ENTRY.unpack_from(self.entries, index * _WRITE_ENTRY.size)
        return Request(c.CMD_WRITE, 0, cookie, offset, length, self.payload[start : start + length])

    def requests(self, start: int = 0) -> list[Request]:
        """The WRITEs from the ``start``-th on, as :class:`Request` events."""
        return [self.request(i) for i in range(start, len(self))]

    def __repr__(self) -> str:
        return f"WriteRun({len(self)} WRITEs)"


class Disconnect:
    """NBD_CMD_DISC: no reply; finish what is in flight, then close."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Disconnect()"


class Violation:
    """A bad request magic: answer what came before, then close (nothing after it is parsed)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"Violation({self.message!r})"


Event = Request | Rejected | PayloadFollows | ReadRun | WriteRun | Disconnect | Violation

_ENTRY = struct.Struct("=QQQ")
_WRITE_ENTRY = struct.Struct("=QQQQ")


SCRATCH_SIZE = 256 * 1024
FIRST_READ_AFTER_STREAM = REQUEST_SIZE
"""How much the read after a streamed payload may take: the next header only, so that when the next request
is a large WRITE too its whole payload stays on the stream for the caller (no head to write separately)."""


class Transmission:
    """Parses requests for one connection after a successful handshake.

    Two ways to feed it: :meth:`receive_data` with bytes, or -- for transports that read into buffers
    (``asyncio.BufferedProtocol``) -- :meth:`get_buffer` / :meth:`buffer_updated`. With the latter a WRITE
    payload that spans reads is received straight into its own buffer, with no copy in Python. ``allocate``
    (length -> writable buffer, or None for "not now") chooses that buffer, e.g. page-aligned memory for
    O_DIRECT; default bytearray. With ``allocate_alone`` it is asked only when no event precedes that WRITE in
    the same call (the parser stops there and sets :attr:`waiting`): a transport that accounts for memory
    then sees the requests before the payload first, in order. ``scratch`` is where other bytes are received:
    one buffer may be shared by every connection of an event loop, because :meth:`buffer_updated` copies out
    whatever it keeps.
    """

    def __init__(
        self,
        negotiated: Negotiated,
        allocate: Callable[[int], Any] | None = None,
        scratch: memoryview | None = None,
        *,
        allocate_alone: bool = False,
        stream_min: int = 0,
        stream_max: int = c.MAX_PAYLOAD,
        batch_reads: int = 0,
        batch_writes: int = 0,
    ) -> None:
        self.negotiated = negotiated
        # Runs of plain READs shorter than batch_reads come as one ReadRun event, of plain WRITEs shorter than
        # batch_writes with their whole payload at hand as one WriteRun (0: never).
        # The scanners take exactly the requests the fast path below accepts without error, nothing else.
        self.batch_reads = batch_reads
        self.batch_writes = 0 if negotiated.export.read_only else batch_writes
        # Plain WRITEs (no flags) from stream_min to stream_max bytes long whose payload has not fully arrived
        # are handed out as PayloadFollows, their payload left on the stream for the caller; stream_min 0:
        # never. Longer ones get a buffer from ``allocate`` as usual (and may wait for it).
        self.stream_min = stream_min
        self.stream_max = stream_max
        self.export = negotiated.export
        self.structured = negotiated.structured
        self.meta_context_id = negotiated.meta_context_id
        self.closed = False
        self.waiting = False
        """True while a WRITE header waits for ``allocate`` to grant its payload buffer."""
        self._allocate = allocate or bytearray
        self._allocate_alone = allocate_alone
        self._buf = bytearray()
        self._skip = 0  # payload bytes of a rejected WRITE still to discard
        self._skipped: Rejected | None = None  # its error reply, released once the payload is consumed
        self._pending: tuple[int, int, int, int] | None = None  # WRITE header waiting for its payload
        self._payload: Any = None
        self._payload_view: memoryview | None = None
        self._need = 0
        self._filled = 0
        self._scratch = scratch
        self._short_read = False  # the next read follows a streamed payload: keep it short
        self._into_payload = False
        export = negotiated.export
        self._read_limits = (export.size, export.max_block, export.min_block - 1, batch_reads) if batch_reads else None

    @property
    def receiving(self) -> int:
        """The length of the WRITE payload being received into its own buffer, 0 if none. That buffer was paid
        for when ``allocate`` (or :meth:`collect`'s caller) handed it out: if the stream ends first, the
        charge is the caller's to release."""
        return self._need if self._pending is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes currently held by the parser (for tests of the memory bound)."""
        return len(self._buf) + self._need

    # -- buffer interface -----------------------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the transport should put the next bytes it receives."""
        if self._pending is not None and self._payload_view is not None:
            self._into_payload = True
            return self._payload_view[self._filled :]
        self._into_payload = False
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH_SIZE))
        if self._short_read:  # until bytes arrive: a read that found nothing asks again
            return self._scratch[:FIRST_READ_AFTER_STREAM]
        return self._scratch

    def read_limits(self) -> tuple[memoryview, int, int, int, int] | None:
        """``(scratch, size, max_block, unaligned, batch_reads)`` for ``_batch.serve_reads``, which may then take,
        from the start of the bytes just received into ``scratch`` (:meth:`get_buffer`), exactly the
        leading run of plain READs this parser would hand out as a :class:`ReadRun`; the caller passes the
        rest to :meth:`buffer_updated` with ``start``. None where it must not take any: READs not batched, or
        not at a request boundary (bytes held, a payload being received or skipped, a header waiting for
        memory, the short read after a streamed payload)."""
        if (
            self._into_payload
            or self._short_read
            or self._read_limits is None
            or self._scratch is None
            or not self._at_boundary()
        ):
            return None
        return (self._scratch, *self._read_limits)

    def _at_boundary(self) -> bool:
        """Whether the stream is at a request boundary with nothing held: open, no bytes buffered, no payload
        being received or skipped, no header waiting for memory -- where a caller may take whole requests
        from the stream itself (:meth:`read_limits`, :meth:`splice_limits`)."""
        return not (self.closed or self.waiting or self._buf or self._pending is not None or self._skip)

    def buffer_updated(self, nbytes: int, start: int = 0) -> list[Event]:
        """``nbytes`` were written into the buffer :meth:`get_buffer` returned; the first ``start`` of them are
        taken already (see :meth:`read_limits`)."""
        if self._into_payload:
            self._into_payload = False
            events: list[Event] = []
            self._filled += nbytes
            if self._filled == self._need:
                self._complete_payload(events)
            return events
        assert self._scratch is not None
        if nbytes:
            self._short_read = False
        return self.receive_data(self._scratch[start:nbytes])

    def resume(self) -> list[Event]:
        """Parse on after ``allocate`` refused a payload buffer (call when it may grant it)."""
        self.waiting = False
        if self.closed or not self._buf:
            return []
        events: list[Event] = []
        pos = self._parse(self._buf, events)
        del self._buf[:pos]
        return events

    # -- bytes interface ------------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.closed:
            return []
        if self.waiting:  # the transport pauses reading meanwhile; this is what it had in hand
            self._buf += data
            return []
        events: list[Event] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
            if not self._skip and self._skipped is not None:
                events.append(self._skipped)
                self._skipped = None
        if self._pending is not None and len(view):
            view = self._fill(view, events)
        if not len(view) or self.closed:
            return events
        if self._buf:
            self._buf += view
            src: bytes | bytearray = self._buf
            pos = self._parse(src, events)
            del self._buf[:pos]
        else:
            src = bytes(view) if not isinstance(data, bytes) or len(view) != len(data) else data
            pos = self._parse(src, events)
            if pos < len(src):
                self._buf = bytearray(memoryview(src)[pos:])
        return events

    def collect(self, follows: PayloadFollows, payload: Any) -> None:
        """Receive the rest of ``follows``'s payload the ordinary way after all, into ``payload`` (a buffer of
        at least its length, which the caller has paid for, as for ``allocate``): it comes out as a
        :class:`Request` whose ``buffer`` is ``payload`` once the stream has delivered it."""
        req = follows.request
        self._short_read = False  # the payload's rest comes first; the header after it is read as usual
        self._start_payload((req.command, req.flags, req.cookie, req.offset), req.length, payload)
        with memoryview(follows.head) as head:
            self._fill(head, [])

    def _start_payload(self, pending: tuple[int, int, int, int], length: int, payload: Any) -> None:
        self._pending = pending
        self._payload = payload
        self._payload_view = memoryview(self._payload)[:length]
        self._need = length
        self._filled = 0

    def _complete_payload(self, events: list[Event]) -> None:
        command, flags, cookie, offset = self._pending  # type: ignore[misc]
        req = Request(command, flags, cookie, offset, self._need, self._payload_view)
        req.buffer = self._payload
        events.append(req)
        self._pending = None
        self._payload = None
        self._payload_view = None
        self._need = 0
        self._filled = 0

    def _fill(self, view: memoryview, events: list[Event]) -> memoryview:
        assert self._payload_view is not None
        n = min(self._need - self._filled, len(view))
        self._payload_view[self._filled : self._filled + n] = view[:n]
        self._filled += n
        if self._filled == self._need:
            self._complete_payload(events)
        return view[n:]

    def _parse(self, src: bytes | bytearray, events: list[Event]) -> int:
        pos = 0
        end = len(src)
        unpack = _REQUEST.unpack_from
        export = self.export
        size = export.size
        max_block = export.max_block
        writable = not export.read_only
        unaligned = export.min_block - 1  # a power of two: offset and length must have none of these bits
        batch = self.batch_reads
        batch_writes = self.batch_writes
        while end - pos >= REQUEST_SIZE:
            magic, flags, command, cookie, offset, length = unpack(src, pos)
            if batch and command == c.CMD_READ and not flags and length < batch:
                entries, after = scan_reads(src, pos, size, max_block, unaligned, batch)
                if entries:
                    events.append(ReadRun(entries))
                    pos = after
                    continue
            elif batch_writes and command == c.CMD_WRITE and not flags and length < batch_writes:
                entries, after = scan_writes(src, pos, size, max_block, unaligned, batch_writes)
                if entries:
                    # bytes are immutable and may be viewed; the parser's own bytearray changes after this
                    run = memoryview(src)[pos:after] if isinstance(src, bytes) else bytes(src[pos:after])
                    events.append(WriteRun(entries, run))
                    pos = after
                    continue
            if magic != c.REQUEST_MAGIC:
                self.closed = True
                events.append(Violation(f"bad request magic {magic:#x}"))
                return end
            body = pos + REQUEST_SIZE
            # fast path: plain READ/WRITE within bounds, aligned to the minimum block size
            if (
                command <= c.CMD_WRITE
                and not flags & ~c.CMD_FLAG_FUA
                and 0 < length <= max_block
                and offset + length <= size
                and not (offset | length) & unaligned
                and (command == c.CMD_READ or writable)
            ):
                error = None
            else:
                if command == c.CMD_DISC:
                    self.closed = True
                    events.append(Disconnect())
                    return end
                error = validate.check(command, flags, offset, length, export, self.structured, self.meta_context_id)
            if command == c.CMD_WRITE:
                if error is not None:
                    # The error goes out only after the whole payload has been read: a client may still be
                    # sending it and not yet expect a reply (libnbd does not).
                    rejected = self._reject(command, cookie, error)
                    have = min(end - body, length)
                    self._skip = length - have
                    pos = body + have
                    if self._skip:
                        self._skipped = rejected
                        return end
                    events.append(rejected)
                    continue
                if end - body >= length:
                    events.append(Request(command, flags, cookie, offset, length, src[body : body + length]))
                    pos = body + length
                    continue
                if self.stream_min and self.stream_min <= length <= self.stream_max and not flags:
                    # payload incomplete and large: the caller takes the rest straight from the stream
                    head = src[body:end] if isinstance(src, bytearray) else memoryview(src)[body:end]
                    events.append(PayloadFollows(Request(command, flags, cookie, offset, length), head))
                    self._short_read = True
                    return end
                # payload incomplete: collect it in its own buffer, exactly once
                payload = None if self._allocate_alone and events else self._allocate(length)
                if payload is None:  # not yet: keep this header (and what came of the payload) buffered
                    self.waiting = True
                    return pos
                self._start_payload((command, flags, cookie, offset), length, payload)
                pos = body
                rest = memoryview(src)[pos:]
                try:
                    self._fill(rest, events)
                finally:
                    rest.release()
                return end
            pos = body
            if error is not None:
                events.append(self._reject(command, cookie, error))
            else:
                events.append(Request(command, flags, cookie, offset, length))
        return pos

    def splice_limits(self) -> tuple[int, int, int, int, int] | None:
        """``(size, max_block, unaligned, stream_min, stream_max)`` for ``_batch.splice_writes``, which may then
        take from the stream exactly the requests this parser would hand out as :class:`PayloadFollows` (plain
        WRITEs within the export, aligned, stream_min to stream_max long) and nothing else; None where it must
        not take any: streaming off, a read-only export, closed, or not at a request boundary (bytes held, a
        payload being received or skipped, a header waiting for memory)."""
        if not self.stream_min or self.export.read_only or not self._at_boundary():
            return None
        export = self.export
        return (export.size, export.max_block, export.min_block - 1, self.stream_min, self.stream_max)

    def _reject(self, command: int, cookie: int, error: tuple[int, str]) -> Rejected:
        errno, message = error
        return Rejected(
            command, cookie, errno, message, replies.error(self.structured, cookie, command, errno, message)
        )
