"""The power-loss lab: an emulated host (page cache, device write cache), power cuts, process crashes,
a write log, crash-state exploration, the durability matrix and a real SQLite workload.

See docs/lab.md. The disk stack lives in :mod:`cachemode.lab.disk`; nothing here needs the NBD server.
"""

from cachemode.lab.disk import LabConfig, LabDisk, LabError, open_lab_disk
from cachemode.lab.layers import EmulatedDiskCache, EmulatedPageCache, MemoryDisk, VolatileCache
from cachemode.lab.record import LogError, Recorder, read_log

__all__ = [
    "EmulatedDiskCache",
    "EmulatedPageCache",
    "LabConfig",
    "LabDisk",
    "LabError",
    "LogError",
    "MemoryDisk",
    "Recorder",
    "VolatileCache",
    "open_lab_disk",
    "read_log",
]
