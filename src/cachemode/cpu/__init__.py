"""Trace-driven CPU cache simulator with Dinero IV's accounting.

The pieces, each in its own module:

- :mod:`~cachemode.cpu.trace`: readers for din, extended din, Valgrind lackey and binary traces -> NumPy arrays,
  in chunks, from files (plain or compressed) or stdin.
- :mod:`~cachemode.cpu.writer`: writing traces chunk by chunk, in the format a file name asks for.
- :mod:`~cachemode.cpu.synth`: classic workloads (matrix multiply, stream, strides, pointer chasing...) as traces.
- :mod:`~cachemode.cpu.config`: cache and hierarchy descriptions, validation, TOML loading.
- :mod:`~cachemode.cpu.kernels`: one cache level over an event stream, on the compiled core (``_core.c``).
- :mod:`~cachemode.cpu.simulate`: wires levels together (routing, merging, end-of-run copy-back).
- :mod:`~cachemode.cpu.stats`: per-cache counters, as objects, dicts and JSON.
- :mod:`~cachemode.cpu.dinero`: Dinero IV option parsing and report layout.
- :mod:`~cachemode.cpu.sweep`: miss-rate curves over size and associativity.
- :mod:`~cachemode.cpu.record`: recording a program's trace with valgrind lackey.
"""

from cachemode.cpu.config import CacheConfig, Hierarchy, Level
from cachemode.cpu.simulate import simulate
from cachemode.cpu.stats import CacheStats, SimResult
from cachemode.cpu.trace import Trace, TraceError, read_trace

__all__ = [
    "CacheConfig",
    "CacheStats",
    "Hierarchy",
    "Level",
    "SimResult",
    "Trace",
    "TraceError",
    "read_trace",
    "simulate",
]
