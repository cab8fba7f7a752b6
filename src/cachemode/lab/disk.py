"""The lab disk: a virtual disk whose host page cache and device write cache are emulated in memory.

The stack, top first, as the mode walks it::

    [Recorder]           --record LOG: the guest's requests, in completion order
    Tracker              numbers each write so the lab can tell which acknowledged writes are still volatile
    ModeLayer            the mode: unsafe drops FLUSH/FUA; O_DSYNC modes (and WCE off) add FUA to every write
    [EmulatedPageCache]  only without cache.direct (writeback, writethrough, unsafe)
    EmulatedDiskCache    the device's volatile write cache (capacity 0: a device without one)
    medium               the image file opened plainly (no O_DIRECT/O_DSYNC: the lab emulates them)

The layers above the page cache are the *process* (QEMU, cachemode serve); the page cache and the device cache
are the *host*. :meth:`LabDisk.crash_process` throws the process away and keeps the host;
:meth:`LabDisk.power_cut` loses the host's volatile layers too. Either way the disk then serves what
survived, as after a restart or a reboot.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cachemode.disk.image import ImageFile
from cachemode.disk.layer import Layer
from cachemode.disk.mode import ModeLayer
from cachemode.disk.virtual import VirtualDisk, create_image
from cachemode.errors import CachemodeError
from cachemode.lab.layers import EmulatedDiskCache, EmulatedPageCache, VolatileCache, set_write_id
from cachemode.lab.record import Recorder
from cachemode.modes import CacheMode, get_mode

MiB = 1 << 20
DISK_FLUSH = ("honour", "ignore")


class LabError(CachemodeError):
    """A lab request that cannot be carried out (bad size, bad survivor policy, ...)."""


@dataclass(frozen=True)
class LabConfig:
    """The emulated host. Sizes in bytes; ``writeback_after`` in seconds (None: no background writeback)."""

    host_cache: int = 256 * MiB
    disk_cache: int = 64 * MiB
    writeback_after: float | None = None
    record: str | None = None
    block: int = 512
    disk_flush: str = "honour"  # "ignore": a device that acknowledges FLUSH and FUA without writing back

    def __post_init__(self) -> None:
        if self.host_cache < 0 or self.disk_cache < 0:
            raise LabError("cache sizes must not be negative")
        if self.disk_flush not in DISK_FLUSH:
            raise LabError(f"unknown --disk-flush {self.disk_flush!r} (choose {' or '.join(DISK_FLUSH)})")
        if self.writeback_after is not None and self.writeback_after <= 0:
            raise LabError("--writeback-after must be a positive number of seconds")


class Tracker(Layer):
    """Gives each write-type request an id (seen by the volatile layers) and counts what was acknowledged."""

    def __init__(self, lower: Layer, lab: LabDisk) -> None:
        super().__init__(lower)
        self.lab = lab

    def _do(self, fua: bool, call: Callable[[], None]) -> None:
        wid = next(self.lab._ids)
        set_write_id(wid)
        try:
            call()
        finally:
            set_write_id(0)
        with self.lab._stats_lock:
            self.lab.acked.add(wid)
            self.lab.stats["writes_acknowledged"] += 1
            if fua:
                self.lab.stats["fua_writes"] += 1

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        self._do(fua, lambda: self.lower.pwrite(data, offset, fua=fua))

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._do(fua, lambda: self.lower.trim(offset, length, fua=fua))

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        self._do(fua, lambda: self.lower.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast))

    def flush(self) -> None:
        self.lower.flush()
        with self.lab._stats_lock:
            self.lab.stats["flushes"] += 1


class LabDisk(VirtualDisk):
    """A :class:`VirtualDisk` over emulated volatile layers, with power cuts and process crashes.

    ``medium`` is the bottom layer: an :class:`ImageFile` opened plainly, or a
    :class:`~cachemode.lab.layers.MemoryDisk`.
    """

    def __init__(
        self, medium: Layer, mode: str | CacheMode, config: LabConfig | None = None, *, write_cache: bool = True
    ) -> None:
        self.config = config or LabConfig()
        self.medium = medium
        cache_mode = get_mode(mode)
        kw = {"block": self.config.block, "writeback_after": self.config.writeback_after}
        self.disk_cache = EmulatedDiskCache(
            medium, self.config.disk_cache, honour_flush=self.config.disk_flush == "honour", **kw
        )
        self.page_cache: EmulatedPageCache | None = None
        if not cache_mode.direct and self.config.host_cache > 0:
            self.page_cache = EmulatedPageCache(self.disk_cache, self.config.host_cache, **kw)
        self._ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self.acked: set[int] = set()
        self.stats = {
            "writes_acknowledged": 0,
            "fua_writes": 0,
            "flushes": 0,
            "power_cuts": 0,
            "process_crashes": 0,
            "writes_lost": 0,
            "bytes_lost": 0,
        }
        self.recorder: Recorder | None = None
        self._closed = False
        self._boot(cache_mode, write_cache, record=self.config.record)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if self.config.writeback_after is not None:
            self._flusher = threading.Thread(target=self._background_writeback, name="lab-writeback", daemon=True)
            self._flusher.start()

    # -- the process ----------------------------------------------------------------------------------------
    @property
    def volatile_layers(self) -> list[VolatileCache]:
        return [layer for layer in (self.page_cache, self.disk_cache) if layer is not None]

    def _boot(self, mode: CacheMode, write_cache: bool, record: str | None = None) -> None:
        """Start a (new) process over the host's layers: a fresh mode layer, tracker and recorder."""
        host_top: Layer = self.page_cache if self.page_cache is not None else self.disk_cache
        mode_layer = ModeLayer(mode, host_top, write_cache=write_cache)
        entry: Layer = Tracker(mode_layer, self)
        self.recorder = None
        if record:
            # A device that ignores FLUSH and FUA makes none of them a barrier: its log records none.
            self.recorder = Recorder(entry, record, barriers=self.config.disk_flush == "honour")
            entry = self.recorder
        super().__init__(mode_layer, self.medium, entry=entry)  # type: ignore[arg-type]

    def mark(self, name: str) -> None:
        """Put a named mark in the write log (no-op when not recording)."""
        if self.recorder is not None:
            self.recorder.mark(name)

    # -- failures -------------------------------------------------------------------------------------------
    def crash_process(self) -> dict[str, object]:
        """The hypervisor process dies; the host lives: page cache and device cache keep their contents."""
        if self.recorder is not None:
            self.recorder.stop()
        with self._stats_lock:
            self.stats["process_crashes"] += 1
        self._boot(self.mode, self.write_cache)
        return self.status()

    def power_cut(self, survivors: str = "worst", seed: int | None = None) -> dict[str, object]:
        """Power fails: every volatile layer is lost, then the host reboots and the disk serves what survived.

        ``survivors="worst"`` loses everything volatile; ``"random"`` lets an arbitrary subset of dirty
        blocks reach the layer below first (page cache into device cache, device cache onto the medium), as
        real writeback racing the power cut might; ``seed`` makes that subset reproducible.
        """
        if survivors not in ("worst", "random"):
            raise LabError(f"unknown survivor policy {survivors!r} (choose worst or random)")
        rng = random.Random(seed) if survivors == "random" else None
        if self.recorder is not None:
            self.recorder.stop()
        lost_ids: set[int] = set()
        bytes_lost = 0
        locks = [layer._lock for layer in self.volatile_layers]
        for lock in locks:
            lock.acquire()
        try:
            for layer in self.volatile_layers:  # top first: page-cache survivors land in the device cache
                if rng is not None:
                    kept = [b for b in layer._dirty if rng.random() < 0.5]
                    layer._writeback(kept)
                lost_ids |= {wid for _, wid, _ in layer._dirty.values()}
                _, lost = layer.power_cut(None)
                bytes_lost += lost
        finally:
            for lock in reversed(locks):
                lock.release()
        with self._stats_lock:
            self.stats["power_cuts"] += 1
            self.stats["writes_lost"] += len(lost_ids & self.acked)
            self.stats["bytes_lost"] += bytes_lost
        self._boot(self.mode, self.write_cache)
        out = self.status()
        out["survivors"] = survivors
        out["seed"] = seed
        out["lost_now"] = {"writes": len(lost_ids), "bytes": bytes_lost}
        return out

    def status(self) -> dict[str, object]:
        """Dirty bytes per layer and write counts: acknowledged, durable, still only in volatile memory."""
        volatile: set[int] = set()
        layers = []
        for layer in self.volatile_layers:
            volatile |= layer.dirty_write_ids()
            layers.append(
                {
                    "layer": layer.name,
                    "capacity": layer.capacity,
                    "dirty_bytes": layer.dirty_bytes,
                    "written_back_bytes": layer.written_back,
                    "lost_bytes": layer.lost,
                }
            )
        with self._stats_lock:
            stats = dict(self.stats)
            acked = len(self.acked)
            pending = len(volatile & self.acked)
        return {
            "mode": self.mode.name,
            "write_cache": self.write_cache,
            "disk_flush": self.config.disk_flush,
            "layers": layers,
            "writes_volatile": pending,
            "writes_durable": acked - pending - stats["writes_lost"],
            **stats,
            "recording": self.recorder.log.path if self.recorder is not None and self.recorder.enabled else None,
        }

    def _background_writeback(self) -> None:
        assert self.config.writeback_after is not None
        period = min(1.0, self.config.writeback_after / 4)
        while not self._stop.wait(period):
            for layer in self.volatile_layers:
                layer.expire()

    def close(self) -> None:
        """A clean shutdown: the process closes (flushing, except in unsafe), then the host writes back."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            self.entry.close()  # the recorder (if any), the tracker, the mode layer and everything below
        finally:
            if self._flusher is not None:
                self._flusher.join(timeout=5)


def open_lab_disk(
    path: str | os.PathLike[str],
    mode: str | CacheMode | None = None,
    config: LabConfig | None = None,
    *,
    write_cache: bool = True,
    create_size: int | None = None,
) -> LabDisk:
    """Open an image for the lab: plainly (the lab emulates O_DIRECT and O_DSYNC), under the emulated host."""
    if create_size is not None:
        create_image(path, create_size)
    image = ImageFile(path)
    try:
        return LabDisk(image, get_mode(mode), config, write_cache=write_cache)
    except BaseException:
        image.close()
        raise
