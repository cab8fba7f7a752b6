"""The cache-mode table: the one source of truth for every cache mode.

QEMU expands ``cache=MODE`` into three booleans (``block.c``, ``bdrv_parse_cache_mode``):
``cache.writeback`` (the guest sees a volatile write cache), ``cache.direct`` (O_DIRECT, the host page cache
is bypassed) and ``cache.no-flush`` (guest flushes are dropped). Everything else here -- the open(2) flags,
the NBD flags a client is told, how FLUSH and FUA are handled, what survives each kind of failure -- is
*derived* from those three booleans and the guest's write-cache switch, never written down a second time.

Following the study note this project implements, writethrough and directsync open the image with O_DSYNC
(directsync with O_DIRECT too), so per-write durability is visible on the file descriptor. Today's QEMU gets
the same guarantee by adding FUA to every write from above; cachemode does that only for the guest
write-cache switch (WCE off), exactly as QEMU does, without reopening the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum


class Failure(StrEnum):
    """The three failures the study note distinguishes, from mildest to worst."""

    GUEST_CRASH = "guest_crash"
    PROCESS_CRASH = "process_crash"
    POWER_LOSS = "power_loss"

    @property
    def label(self) -> str:
        return {
            "guest_crash": "guest crash",
            "process_crash": "hypervisor crash",
            "power_loss": "host power loss",
        }[self.value]


@dataclass(frozen=True)
class Survival:
    """What a failure leaves of acknowledged writes.

    ``acked``: writes acknowledged to the guest but never covered by a FLUSH or FUA.
    ``flushed``: writes covered by a completed FLUSH, or written with FUA.
    True means *guaranteed* to survive; False means *may be lost*.
    """

    acked: bool
    flushed: bool


@dataclass(frozen=True)
class CacheMode:
    """One row of the mode table: QEMU's three cache booleans plus naming and prose."""

    name: str
    writeback: bool
    direct: bool
    no_flush: bool
    summary: str
    aliases: tuple[str, ...] = ()

    # --- what the host does -------------------------------------------------------------------------------
    @property
    def open_flags(self) -> tuple[str, ...]:
        """Names of the open(2) flags beyond O_RDWR/O_RDONLY that the image is opened with."""
        flags = []
        if self.direct:
            flags.append("O_DIRECT")
        if not self.writeback:
            flags.append("O_DSYNC")
        return tuple(flags)

    @property
    def os_flags(self) -> int:
        """The same flags as an integer for :func:`os.open`."""
        value = 0
        for flag in self.open_flags:
            value |= getattr(os, flag)
        return value

    @property
    def uses_host_page_cache(self) -> bool:
        return not self.direct

    @property
    def write_durable_on_return(self) -> bool:
        """True when every write is on stable storage before it is acknowledged (O_DSYNC)."""
        return not self.writeback

    # --- what the guest is told, with the guest's write-cache switch ---------------------------------------
    def guest_write_cache(self, write_cache: bool = True) -> bool:
        """Whether the guest sees a volatile write cache (and so SEND_FLUSH/SEND_FUA are advertised).

        ``write_cache`` is the guest-toggled switch (QEMU's ``write-cache=on|off``, virtio's WCE bit). With it off,
        the guest is told there is no cache in every mode.
        """
        return self.writeback and write_cache

    def every_write_durable(self, write_cache: bool = True) -> bool:
        """Whether each write is durable before it is acknowledged.

        True for O_DSYNC modes, and for writeback/none with the guest's write cache off (QEMU then adds FUA to
        every write). Never true for unsafe: it drops FUA too, so turning the cache off changes nothing.
        """
        if self.no_flush:
            return False
        return self.write_durable_on_return or not write_cache

    def flush_syncs(self, write_cache: bool = True) -> bool:
        """Whether a guest FLUSH reaches stable storage with an fdatasync.

        unsafe drops it; O_DSYNC modes have nothing left to sync, so a FLUSH they receive anyway is answered
        at once; writeback/none call fdatasync (for ``none``, the device's own cache may hold the data).
        """
        return not self.no_flush and self.writeback

    def fua_honoured(self) -> bool:
        """Whether a write with FUA is made durable before its reply (unsafe strips FUA)."""
        return not self.no_flush

    # --- the data-safety table -----------------------------------------------------------------------------
    def survival(self, failure: Failure, write_cache: bool = True) -> Survival:
        """What ``failure`` leaves of acknowledged writes, assuming the host storage honours flushes.

        A guest crash or a hypervisor-process crash leaves the host kernel and device running: every write
        the process completed is at least in the page cache, so it survives (raw images; qcow2 metadata held
        in QEMU's memory is another matter). A power loss takes the page cache and the device's volatile
        cache: unflushed writes may be lost unless every write was durable on return, and in unsafe even
        flushed ones, because no flush ever reached the device.
        """
        if failure is not Failure.POWER_LOSS:
            return Survival(acked=True, flushed=True)
        return Survival(acked=self.every_write_durable(write_cache), flushed=not self.no_flush)

    def as_dict(self, write_cache: bool = True) -> dict[str, object]:
        """The row as plain data, for ``cachemode modes --json``."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "writeback": self.writeback,
            "direct": self.direct,
            "no_flush": self.no_flush,
            "open_flags": list(self.open_flags),
            "host_page_cache": self.uses_host_page_cache,
            "guest_write_cache": self.guest_write_cache(write_cache),
            "advertise_flush": self.guest_write_cache(write_cache),
            "advertise_fua": self.guest_write_cache(write_cache),
            "every_write_durable": self.every_write_durable(write_cache),
            "flush_calls_fdatasync": self.flush_syncs(write_cache),
            "fua_honoured": self.fua_honoured(),
            "survives": {
                f.value: {
                    "acked_unflushed": self.survival(f, write_cache).acked,
                    "flushed": self.survival(f, write_cache).flushed,
                }
                for f in Failure
            },
            "summary": self.summary,
        }


MODES: tuple[CacheMode, ...] = (
    CacheMode(
        "writeback",
        writeback=True,
        direct=False,
        no_flush=False,
        summary="host page cache; acknowledged once in the page cache; the guest must flush",
    ),
    CacheMode(
        "none",
        writeback=True,
        direct=True,
        no_flush=False,
        summary="O_DIRECT bypasses the page cache; the device's cache is still volatile, so the guest must flush",
        aliases=("off",),
    ),
    CacheMode(
        "writethrough",
        writeback=False,
        direct=False,
        no_flush=False,
        summary="O_DSYNC through the page cache; every write durable before it is acknowledged",
    ),
    CacheMode(
        "directsync",
        writeback=False,
        direct=True,
        no_flush=False,
        summary="O_DIRECT | O_DSYNC; every write durable, page cache bypassed",
    ),
    CacheMode(
        "unsafe",
        writeback=True,
        direct=False,
        no_flush=True,
        summary="like writeback, but every flush and FUA is ignored, even at close",
    ),
)

DEFAULT_MODE = "writeback"
"""What an unspecified cache mode means (QEMU >= 1.2 for -drive, qemu-nbd >= 6.2)."""

_BY_NAME: dict[str, CacheMode] = {alias: m for m in MODES for alias in (m.name, *m.aliases)}


class UnknownModeError(ValueError):
    """Raised for a cache-mode name that is not in the table."""


def get_mode(name: str | CacheMode | None = None) -> CacheMode:
    """Look a mode up by name or alias; ``None`` or ``""`` means the default, writeback."""
    if isinstance(name, CacheMode):
        return name
    key = (name or DEFAULT_MODE).strip().lower()
    try:
        return _BY_NAME[key]
    except KeyError:
        choices = ", ".join(sorted(_BY_NAME))
        raise UnknownModeError(f"unknown cache mode {name!r} (choose from {choices})") from None


def mode_names(with_aliases: bool = True) -> list[str]:
    """All accepted names, for CLI choices."""
    return sorted(_BY_NAME) if with_aliases else [m.name for m in MODES]
