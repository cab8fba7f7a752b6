"""Memory budgets: how much a client may make the server hold, per connection and for the whole server.

One figure per connection bounds everything the server holds for it, in every mode and on every path: READ
data from the moment the request is admitted (an AIO or io_uring read in flight has its buffer already), WRITE
payloads from the moment their buffer is allocated until the write completes, and reply bytes until the kernel
took them (the transport's buffer counts, paused or not). A WRITE whose payload is spliced from the socket
into the image (:mod:`cachemode.nbd.splice`) is admitted at dispatch and charged like any other, its length,
although most of it stays in the kernel's pipe: what the server does hold of it -- the bytes that came with
its header, and a full pipe read out into memory (at most the pipe's 1 MiB) -- is less than that. A request is
admitted only while it fits in its connection's budget and the server's; one that does not waits, unexecuted,
with reading paused, until replies leave or requests complete. The server's budget bounds the sum over all
connections, so many hostile clients cannot add up to more than it; requests of a connection that holds almost
nothing (up to :data:`RESERVE` bytes) are admitted whatever the others hold, so a well-behaved client is
served even while hostile ones fill the server's budget.

The bound is therefore: per connection max(its budget, one request up to the 32 MiB maximum payload -- a
request larger than the budget is admitted alone, beside at most :data:`TRANSPORT_HIGH_WATER` of replies the
transport is still sending), and for the server its budget plus :data:`RESERVE` per
connection. Error replies to rejected requests are not admitted one by one (they cost no disk work) but
count once queued, so reading pauses after at most one read's worth of them past the budget. What the kernel
holds in socket buffers is not counted (it is not the process's memory).

Freed buffers must also leave the process: :func:`tune_malloc` makes glibc serve every allocation of 1 MiB
or more with its own mmap (returned on free) instead of raising its threshold and keeping freed buffers in its
arenas, and :func:`trim` asks it to give back what it still holds (smaller blocks, once clients have gone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from typing import Any

from cachemode.nbd import constants as c

log = logging.getLogger("cachemode.nbd")

CONNECTION_BUDGET = 8 * 1024 * 1024
"""Bytes one connection may make the server hold (requests in flight and replies queued, together)."""
SERVER_BUDGET = 256 * 1024 * 1024
"""Bytes all connections together may make the server hold (plus :data:`RESERVE` each)."""
RESERVE = 128 * 1024
"""A connection holding less than this may always start a request that keeps it under it."""
TRANSPORT_HIGH_WATER = 64 * 1024
"""Unsent bytes above which a connection's transport reports back-pressure. Below it the transport sends on
without a word, so the budget's view of it (refreshed at each report) is never more than this out of date,
and it never waits for bytes that the transport drains on its own."""
SMALL_REPLY = 4096
"""What a request without data is charged: its reply (an error message, a short block status) and its event."""


BLOCK_STATUS_REPLY = 8 * c.MAX_EXTENTS + SMALL_REPLY
"""The largest BLOCK_STATUS reply (its descriptors are capped at :data:`constants.MAX_EXTENTS`)."""


def cost(command: int, length: int) -> int:
    """The bytes a request makes the server hold until its reply has left: its data for READ and WRITE, the
    largest possible reply for BLOCK_STATUS, a small reply for the rest."""
    if command <= c.CMD_WRITE:
        return length + SMALL_REPLY
    if command == c.CMD_BLOCK_STATUS:
        return BLOCK_STATUS_REPLY
    return SMALL_REPLY


LARGEST_REQUEST = cost(c.CMD_READ, c.MAX_PAYLOAD)
"""The charge of the largest request: a server budget below it would leave such a request waiting forever."""


class ServerBudget:
    """The server-wide account; connections that wait for room in it are woken, in order, when room frees.

    ``limit`` should be at least :data:`LARGEST_REQUEST` for an export that accepts 32 MiB requests (the
    command line enforces it); a request larger than the limit would never be admitted.
    """

    def __init__(self, loop: Any, limit: int = SERVER_BUDGET, per_connection: int = CONNECTION_BUDGET) -> None:
        if limit < 1 or per_connection < 1:
            raise ValueError("memory budgets must be positive")
        self.loop = loop
        self.limit = limit
        self.per_connection = per_connection
        self.used = 0
        self._waiting: dict[Ledger, Callable[[], None]] = {}

    def ledger(self, wake: Callable[[], None]) -> Ledger:
        """A new connection's account; ``wake`` is called (soon, from the loop) when it may retry."""
        return Ledger(self, wake)

    def _freed(self) -> None:
        if not self._waiting:
            return
        waiting = self._waiting
        self._waiting = {}
        for wake in waiting.values():
            self.loop.call_soon(wake)


class Ledger:
    """One connection's account: ``held`` (admitted, reply not yet handed on) plus ``queued`` (reply bytes in
    the transport's buffer, as last seen)."""

    __slots__ = ("budget", "closed", "held", "queued", "wake")

    def __init__(self, budget: ServerBudget, wake: Callable[[], None]) -> None:
        self.budget = budget
        self.wake = wake
        self.held = 0
        self.queued = 0
        self.closed = False

    @property
    def total(self) -> int:
        return self.held + self.queued

    def full(self) -> bool:
        """Whether this connection has used its budget (reading should pause)."""
        return self.held + self.queued >= self.budget.per_connection

    def room(self) -> int:
        """How much more this connection may be charged now: the least of what is left of its own budget and
        of the server's (the C loops take runs of requests up to it, then leave the rest to :meth:`admit`)."""
        budget = self.budget
        return min(budget.per_connection - self.held - self.queued, budget.limit - budget.used)

    def admit(self, amount: int) -> bool:
        """Charge ``amount`` if it fits; otherwise charge nothing, arrange a wake-up, and return False."""
        budget = self.budget
        mine = self.held + self.queued
        if mine + amount > budget.per_connection and (self.held or self.queued > TRANSPORT_HIGH_WATER):
            # Retried when one of its replies leaves or a request completes. Queued bytes below the high-water
            # mark are not waited for: the transport sends them without reporting, so nothing would wake us.
            return False
        if budget.used + amount > budget.limit and mine + amount > RESERVE:
            if not self.closed:
                budget._waiting[self] = self.wake  # woken when another connection releases memory
            return False
        self.held += amount
        budget.used += amount
        return True

    def charge(self, amount: int) -> None:
        """Charge ``amount`` unconditionally (memory already committed, e.g. the rest of a short write)."""
        self.held += amount
        self.budget.used += amount

    def release(self, amount: int) -> None:
        """``amount`` of what was admitted has been handed on (to the transport or the kernel) or dropped."""
        if amount:
            self.held -= amount
            self.budget.used -= amount
            self.budget._freed()

    def set_queued(self, nbytes: int) -> None:
        """The transport now holds ``nbytes`` of this connection's replies."""
        delta = nbytes - self.queued
        if delta:
            self.queued = nbytes
            self.budget.used += delta
            if delta < 0:
                self.budget._freed()

    def close(self) -> None:
        """The connection is gone: its transport's buffer is freed; requests still in flight release later."""
        self.closed = True
        self.budget._waiting.pop(self, None)
        self.set_queued(0)


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (False where glibc is not the allocator).

    By default glibc raises the threshold to the size of each mmap-backed block freed (up to 32 MiB), after
    which 1 MiB reply buffers come from its arenas and stay in the process once freed; a fixed threshold
    keeps every large buffer in its own mapping, unmapped when freed. Not lower: the parser copies each
    256 KiB read, and a fresh mapping for each of those cost 1 MiB writes measurable CPU.
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Give memory glibc holds but no longer uses back to the system (after a burst of connections left)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
