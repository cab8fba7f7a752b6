"""What one export offers, and the transmission flags that follow from it.

The flags a client is told are derived here and nowhere else: SEND_FLUSH and SEND_FUA exactly when the
guest-visible write cache is on (``disk.guest_write_cache``), because SEND_FLUSH is how an NBD server says
"this device has a volatile write cache".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachemode.nbd import constants as c


@dataclass(frozen=True)
class ExportInfo:
    """The capabilities of one export, as the protocol core sees them (no I/O, no disk object)."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    write_cache: bool = True
    """Whether the client is told of a volatile write cache: SEND_FLUSH and SEND_FUA."""
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = c.MAX_PAYLOAD

    def __post_init__(self) -> None:
        for value, what in ((self.min_block, "minimum"), (self.pref_block, "preferred")):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{what} block size {value} is not a power of two")
        if self.min_block > 65536 or self.pref_block < max(self.min_block, 512):
            raise ValueError("block sizes out of the protocol's range")
        if self.max_block < self.pref_block:
            raise ValueError("maximum block size below the preferred size")

    def transmission_flags(self, structured: bool = True) -> int:
        """The u16 flags sent with the export; SEND_DF only once structured replies are negotiated."""
        flags = c.TF_HAS_FLAGS | c.TF_SEND_CACHE * self.can_cache
        if self.write_cache:
            flags |= c.TF_SEND_FLUSH | c.TF_SEND_FUA
        if self.read_only:
            flags |= c.TF_READ_ONLY
        else:
            if self.can_trim:
                flags |= c.TF_SEND_TRIM
            if self.can_zero:
                flags |= c.TF_SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= c.TF_SEND_FAST_ZERO
        if structured:
            flags |= c.TF_SEND_DF
        if self.can_multi_conn:
            flags |= c.TF_CAN_MULTI_CONN
        return flags

    @classmethod
    def from_disk(cls, disk: Any, name: str = "", description: str = "") -> ExportInfo:
        """Describe a :class:`cachemode.disk.VirtualDisk` (only its attributes are read).

        One disk object shared by every connection of one process means one cache, so CAN_MULTI_CONN holds.
        The preferred block size is at least 4096 and at least the O_DIRECT alignment; the minimum stays 1
        because the disk stack pads misaligned requests itself.
        """
        alignment = max(1, int(getattr(disk, "alignment", 1)))
        return cls(
            name=name,
            size=int(disk.size),
            description=description,
            read_only=bool(disk.read_only),
            write_cache=bool(disk.guest_write_cache),
            can_trim=bool(getattr(disk, "can_trim", True)),
            can_zero=True,
            can_fast_zero=bool(getattr(disk, "can_fast_zero", False)),
            can_cache=True,
            can_multi_conn=True,
            min_block=1,
            pref_block=max(4096, alignment),
            max_block=c.MAX_PAYLOAD,
        )


def describe_flags(flags: int) -> list[str]:
    """Names of the transmission flags set in ``flags``, lowest bit first."""
    return [name for bit, name in sorted(c.TRANSMISSION_FLAG_NAMES.items()) if flags & bit]
