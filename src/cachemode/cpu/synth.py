"""Classic workloads as traces: the data references a textbook loop makes, generated without running it.

Each generator returns a :class:`Trace` of loads (type 0) and stores (type 1) of ``elem``-byte elements, arrays at
fixed, well separated addresses (A at 0x10000000, B at 0x20000000, C at 0x30000000). They are what cache courses
measure: the three matrix-multiply loop orders (naive ijk walks B down its columns; with B transposed both walk
rows; blocked works on tiles that stay in the cache), a sequential stream, strided sweeps, uniform random
accesses, pointer chasing through a random cycle, and a 5-point stencil.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cachemode.cpu.trace import Trace, concat
from cachemode.errors import CachemodeError

A, B, C = 0x1000_0000, 0x2000_0000, 0x3000_0000
MAX_REFS = 200_000_000  # a guard against a typo (n=10000 matrix multiply is 2e12 references)


class SynthError(CachemodeError):
    """Sizes that do not make a workload."""


def _trace(types: np.ndarray, addrs: np.ndarray, elem: int) -> Trace:
    types = types.reshape(-1).astype(np.int8)
    return Trace(types, addrs.reshape(-1).astype(np.uint64), np.full(len(types), elem, np.uint16))


def _check(refs: int) -> None:
    if refs > MAX_REFS:
        raise SynthError(f"{refs:,} references is more than {MAX_REFS:,}; choose smaller sizes")


def matmul(n: int, elem: int = 8, order: str = "naive", tile: int = 16) -> Trace:
    """C = A x B for n x n matrices, row-major. ``order``: ``naive`` (i, j, k: A[i][k] and B[k][j] loaded, the
    sum kept in a register, C[i][j] stored), ``transposed`` (B held transposed, so B^T[j][k] is loaded: both
    walk rows), ``blocked`` (tile x tile blocks of i, j, k; C[i][j] loaded and stored once per k-tile)."""
    if n < 1:
        raise SynthError("matrix size must be at least 1")
    if order == "blocked":
        if tile < 1 or n % tile:
            raise SynthError(f"tile {tile} must divide the matrix size {n}")
        _check(2 * n**3 + 2 * n**3 // tile)
        t = np.arange(tile)
        i, j, k = t[:, None, None], t[None, :, None], t[None, None, :]
        loads_t = np.zeros((tile, tile, 2 * tile + 2), np.int8)
        loads_t[:, :, -1] = 1  # C[i][j] += ...: load C, 2 x tile loads, store C
        parts = []
        for ii in range(0, n, tile):
            for jj in range(0, n, tile):
                for kk in range(0, n, tile):
                    a = A + ((ii + i) * n + kk + k) * elem
                    b = B + ((kk + k) * n + jj + j) * elem
                    ab = np.stack(np.broadcast_arrays(a, b), axis=-1).reshape(tile, tile, 2 * tile)
                    c = (C + ((ii + t[:, None]) * n + jj + t[None, :]) * elem)[:, :, None]
                    parts.append(_trace(loads_t, np.concatenate([c, ab, c], axis=-1), elem))
        return concat(parts)
    if order not in ("naive", "transposed"):
        raise SynthError(f"unknown loop order {order!r} (naive, transposed or blocked)")
    _check(2 * n**3 + n * n)
    i, j, k = (np.arange(n)[:, None, None], np.arange(n)[None, :, None], np.arange(n)[None, None, :])
    a = A + (i * n + k) * elem
    b = B + ((j * n + k) if order == "transposed" else (k * n + j)) * elem
    ab = np.stack(np.broadcast_arrays(a, b), axis=-1).reshape(n, n, 2 * n)
    c = (C + (np.arange(n)[:, None] * n + np.arange(n)[None, :]) * elem)[:, :, None]
    types = np.zeros((n, n, 2 * n + 1), np.int8)
    types[:, :, -1] = 1
    return _trace(types, np.concatenate([ab, c], axis=-1), elem)


def stream(n: int, elem: int = 8) -> Trace:
    """STREAM triad, a[i] = b[i] + s * c[i] over n elements: two sequential loads and a store each."""
    _check(3 * n)
    idx = np.arange(n)[:, None] * elem
    addrs = np.concatenate([B + idx, C + idx, A + idx], axis=1)
    return _trace(np.tile(np.array([0, 0, 1], np.int8), (n, 1)), addrs, elem)


def strided(size: int, stride: int, elem: int = 8, passes: int = 4) -> Trace:
    """Loads every ``stride`` bytes across a ``size``-byte array, ``passes`` times."""
    if stride < 1 or size < stride:
        raise SynthError("the stride must be at least 1 and at most the array size")
    one = A + np.arange(0, size, stride)
    _check(len(one) * passes)
    return _trace(np.zeros(len(one) * passes, np.int8), np.tile(one, passes), elem)


def random_access(size: int, count: int, elem: int = 8, seed: int = 1) -> Trace:
    """``count`` uniform random loads of aligned elements within a ``size``-byte array."""
    _check(count)
    rng = np.random.default_rng(seed)
    return _trace(np.zeros(count, np.int8), A + rng.integers(0, max(size // elem, 1), count) * elem, elem)


def chase(size: int, count: int, node: int = 64, seed: int = 1) -> Trace:
    """Pointer chasing: ``count`` dependent loads, each following a node's next pointer around one random cycle
    through the ``size // node`` nodes of a ``size``-byte pool (the pattern that defeats prefetchers)."""
    nodes = size // node
    if nodes < 2:
        raise SynthError("the pool must hold at least two nodes")
    _check(count)
    cycle = np.random.default_rng(seed).permutation(nodes)  # node cycle[i] points to node cycle[i + 1]
    return _trace(np.zeros(count, np.int8), A + np.resize(cycle, count) * node, 8)


def stencil(n: int, elem: int = 8, sweeps: int = 1) -> Trace:
    """5-point Jacobi sweeps on an n x n grid: v[i][j] = f(u[i][j], its four neighbours) for interior points."""
    if n < 3:
        raise SynthError("the grid must be at least 3 x 3")
    _check(6 * (n - 2) ** 2 * sweeps)
    i, j = np.arange(1, n - 1)[:, None], np.arange(1, n - 1)[None, :]
    offsets = ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0))
    loads = [A + ((i + di) * n + j + dj) * elem for di, dj in offsets]
    store = B + (i * n + j) * elem
    addrs = np.stack([*np.broadcast_arrays(*loads), store], axis=-1)
    types = np.zeros(addrs.shape, np.int8)
    types[..., -1] = 1
    one = _trace(types, addrs, elem)
    return concat([one] * sweeps)


KINDS: dict[str, Callable[..., Trace]] = {
    "mm-naive": lambda o: matmul(o["n"], o["elem"], "naive"),
    "mm-transposed": lambda o: matmul(o["n"], o["elem"], "transposed"),
    "mm-blocked": lambda o: matmul(o["n"], o["elem"], "blocked", o["tile"]),
    "stream": lambda o: stream(o["n"], o["elem"]),
    "strided": lambda o: strided(o["size"], o["stride"], o["elem"], o["passes"] or 4),
    "random": lambda o: random_access(o["size"], o["count"], o["elem"], o["seed"]),
    "chase": lambda o: chase(o["size"], o["count"], o["node"], o["seed"]),
    "stencil": lambda o: stencil(o["n"], o["elem"], o["passes"] or 1),
}
