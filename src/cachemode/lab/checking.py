"""Checking crash states where the work runs: checkers, the state's image, and the task a worker executes.

Everything here may run in a Dask worker process on another machine, so it holds plain data and is pickled:
a :class:`CheckContext` (the checker, where the base image is, the pool of sectors the overlays point into)
reaches each worker once, and each task carries a batch of states as their overlays' runs.

A checker is a :class:`Checker` object. Command checkers get a file: a per-thread scratch image, a reflink
clone of the base per state where the filesystem can, otherwise one copy restored after each check. The
restore writes back only what differs from the base: the state's own sectors when the checker did not write
(the scratch file's mtime still holds the sentinel we set), else the chunks found to differ by comparing with
the base (a read of the image, no write of it: an ext4 journal replay dirties a few chunks, not 32 MiB).
In-process checkers get an :class:`OverlayImage` over the base bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cachemode.disk.layer import Layer
from cachemode.errors import CachemodeError
from cachemode.lab.states import Overlay

if TYPE_CHECKING:
    from cachemode.lab.explore import CrashState

FICLONE = 0x40049409
CHUNK = 1 << 20
MTIME_SENTINEL = 1_000_000_000  # ns since the epoch: 1970, a time no write leaves behind


class ExploreError(CachemodeError):
    """Crash exploration cannot run as asked (base image, checker, options)."""


@dataclass
class Outcome:
    ok: bool
    output: str = ""
    kinds: tuple[str, ...] = ()  # violation kinds, for checkers that classify failures


class Checker:
    """How a crash state is judged. Subclass it for a named checker; it is pickled to workers, so keep it data.

    ``needs_file``: True to be given a path to a raw image of the state (:meth:`check_file`), False to be given
    an :class:`OverlayImage` in memory (:meth:`check_image`).
    """

    needs_file = True

    def describe(self) -> str:
        return type(self).__name__

    def verify(self) -> str | None:
        """Why this checker cannot run in this process (a missing program), or None. Runs on every worker."""
        return None

    def check_file(self, path: str, state: CrashState) -> Outcome:
        raise NotImplementedError

    def check_image(self, image: OverlayImage, state: CrashState) -> Outcome:
        raise NotImplementedError


class FunctionChecker(Checker):
    """An in-process function ``fn(image, state) -> Outcome``; on a cluster it must pickle (cloudpickle)."""

    needs_file = False

    def __init__(self, fn: Callable[[OverlayImage, CrashState], Outcome]) -> None:
        self.fn = fn

    def describe(self) -> str:
        return getattr(self.fn, "__name__", "function")

    def check_image(self, image: OverlayImage, state: CrashState) -> Outcome:
        return self.fn(image, state)


_running: dict[subprocess.Popen[str], str | None] = {}  # checker process -> the exploration it works for
_running_lock = threading.Lock()
_current = threading.local()  # .token: the exploration this thread checks for
_cancelled: set[str] = set()  # explorations cancelled: their batches still running stop at the next state


class CommandChecker(Checker):
    """Runs ``CMD {image}`` on a file image per state; exit status 0 passes.

    A run longer than ``timeout`` seconds is killed with its whole process group and fails as ``timeout``.
    """

    def __init__(self, command: str, timeout: float = 60.0) -> None:
        if "{image}" not in command:
            raise ExploreError(f"--check {command!r} must contain {{image}}, where the crash state's image goes")
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise ExploreError(f"--check {command!r}: {exc}") from None
        if not self.argv:
            raise ExploreError("--check is empty")
        if timeout <= 0:
            raise ExploreError(f"--timeout must be positive, not {timeout}")
        self.command = command
        self.timeout = timeout

    def describe(self) -> str:
        return self.command

    def verify(self) -> str | None:
        if shutil.which(self.argv[0]) is None:
            return f"checker {self.argv[0]!r} not found (not an executable file, nor on PATH)"
        return None

    def check_file(self, path: str, state: CrashState) -> Outcome:
        argv = [a.replace("{image}", path) for a in self.argv]
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", process_group=0
            )
        except OSError as exc:
            raise ExploreError(f"checker {argv[0]!r} cannot run: {exc.strerror}") from None
        token = getattr(_current, "token", None)
        with _running_lock:
            _running[proc] = token
            cancelled = token in _cancelled
        if cancelled:  # cancelled between the batch's check and now: no checker may outlive the run
            _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a child that left the group holds the pipe: stop reading
                proc.wait()
            return Outcome(False, f"checker timed out after {self.timeout:g} s (killed)", ("timeout",))
        finally:
            with _running_lock:
                _running.pop(proc, None)
        out = out.strip()
        if proc.returncode == 0:
            return Outcome(True, out)
        return Outcome(False, f"exit status {proc.returncode}: {out[-2000:]}", ("checker",))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_checkers(token: str) -> None:
    """Kill the checker commands this process runs for one exploration (cancelling it: Ctrl-C does not reach
    their process groups, and on a cluster it would not reach them at all). Run everywhere."""
    with _running_lock:
        _cancelled.add(token)
        procs = [p for p, t in _running.items() if t == token]
    for proc in procs:
        _kill_group(proc)


# -- the state's image ----------------------------------------------------------------------------------------
class OverlayImage(Layer):
    """A crash state's image for an in-process checker: the shared base plus the state's sectors.

    Nothing is copied per state but the sectors the state changes; what the checker writes (SQLite rolling back
    a hot journal) is copy-on-write too, so the base is never touched. ``image[a:b]`` reads a range.
    """

    def __init__(self, base: bytes, sectors: dict[int, bytes], sector: int) -> None:
        super().__init__(None)
        self.base = base
        self.sector = sector
        self.sectors = dict(sectors)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.base)

    @property
    def read_only(self) -> bool:
        return False

    @property
    def alignment(self) -> int:
        return 1

    def _touched(self, offset: int, length: int) -> list[int]:
        first, last = offset // self.sector, (offset + length - 1) // self.sector
        if last - first + 1 <= len(self.sectors):
            return [s for s in range(first, last + 1) if s in self.sectors]
        return sorted(s for s in self.sectors if first <= s <= last)

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            touched = self._touched(offset, length) if length > 0 else []
            if not touched:
                return bytes(self.base[offset : offset + length])
            out = bytearray(self.base[offset : offset + length])
            end = offset + len(out)
            for s in touched:
                start = s * self.sector
                lo, hi = max(start, offset), min(start + self.sector, end)
                out[lo - offset : hi - offset] = self.sectors[s][lo - start : hi - start]
            return bytes(out)

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        return self.pread(max(0, stop - start), start)

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        with self._lock:
            for s in range(offset // self.sector, (end + self.sector - 1) // self.sector):
                start = s * self.sector
                cur = self.sectors.get(s)
                buf = bytearray(cur if cur is not None else self.base[start : start + self.sector])
                lo, hi = max(start, offset), min(start + len(buf), end)
                buf[lo - start : hi - start] = view[lo - offset : hi - offset]
                self.sectors[s] = bytes(buf)

    def zero(self, offset: int, length: int, **kwargs: object) -> None:
        self.pwrite(bytes(length), offset)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScratchImage:
    """A per-thread scratch copy of the base: a reflink clone per state where possible, else copy-and-restore."""

    def __init__(self, base: str, directory: str) -> None:
        self.base = base
        fd, self.path = tempfile.mkstemp(prefix="crash-state-", suffix=".img", dir=directory)
        os.close(fd)
        self.size = os.stat(base).st_size
        self.reflink = self._clone()
        if not self.reflink:
            shutil.copyfile(base, self.path)

    def _clone(self) -> bool:
        try:
            with open(self.base, "rb") as src, open(self.path, "wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return True
        except OSError:
            return False

    def prepare(self, overlay: Overlay, pool: bytes) -> None:
        if self.reflink:
            self._clone()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for offset, data in overlay.pieces(pool, self.size):
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        os.utime(self.path, ns=(MTIME_SENTINEL, MTIME_SENTINEL))

    def restore(self, overlay: Overlay) -> None:
        """Make the scratch the base again, writing only what differs (see the module docstring)."""
        if self.reflink:
            return
        st = os.stat(self.path)
        with open(self.base, "rb") as base, open(self.path, "r+b") as f:
            if st.st_mtime_ns == MTIME_SENTINEL and st.st_size == self.size:
                for disk, count, _ in overlay.runs.tolist():
                    offset = disk * overlay.sector
                    length = min(count * overlay.sector, self.size - offset)
                    os.pwrite(f.fileno(), os.pread(base.fileno(), length, offset), offset)
                return
            f.truncate(self.size)
            for offset in range(0, self.size, CHUNK):
                want = os.pread(base.fileno(), CHUNK, offset)
                if os.pread(f.fileno(), len(want), offset) != want:
                    os.pwrite(f.fileno(), want, offset)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- the base image on a worker -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseImage:
    """The base image as workers get it: a ``path`` they share (checked by ``digest``), or its ``data``."""

    size: int
    path: str | None = None
    digest: str | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass
class CheckContext:
    """What every check of one exploration shares; sent to each worker once."""

    checker: Checker
    base: BaseImage
    pool: bytes = field(repr=False)
    sector: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


class _WorkerState:
    """Per-process caches of one exploration (keyed by its token): scratch images per thread, base file/bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scratch: dict[tuple[str, int], ScratchImage] = {}
        self.base_files: dict[str, str] = {}
        self.base_bytes: dict[str, bytes] = {}
        self.dirs: dict[str, str] = {}

    def directory(self, token: str) -> str:
        with self.lock:
            if token not in self.dirs:
                self.dirs[token] = tempfile.mkdtemp(prefix="cachemode-explore-")
            return self.dirs[token]

    def base_file(self, ctx: CheckContext) -> str:
        if ctx.base.path is not None:
            return ctx.base.path
        with self.lock:
            path = self.base_files.get(ctx.token)
        if path is None:
            path = os.path.join(self.directory(ctx.token), "base.img")
            assert ctx.base.data is not None
            with open(path, "wb") as f:
                f.write(ctx.base.data)
            with self.lock:
                self.base_files[ctx.token] = path
        return path

    def bytes_of(self, ctx: CheckContext) -> bytes:
        if ctx.base.data is not None:
            return ctx.base.data
        with self.lock:
            data = self.base_bytes.get(ctx.token)
        if data is None:
            with open(self.base_file(ctx), "rb") as f:
                data = f.read()
            with self.lock:
                self.base_bytes[ctx.token] = data
        return data

    def scratch_for(self, ctx: CheckContext) -> ScratchImage:
        key = (ctx.token, threading.get_ident())
        with self.lock:
            scratch = self.scratch.get(key)
        if scratch is None:
            scratch = ScratchImage(self.base_file(ctx), self.directory(ctx.token))
            with self.lock:
                self.scratch[key] = scratch
        return scratch

    def release(self, token: str) -> None:
        with self.lock:
            scratches = [self.scratch.pop(k) for k in list(self.scratch) if k[0] == token]
            self.base_files.pop(token, None)
            self.base_bytes.pop(token, None)
            directory = self.dirs.pop(token, None)
        for s in scratches:
            s.remove()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


_worker = _WorkerState()

Batch = list[tuple[int, "CrashState", np.ndarray]]


def check_batch(batch: Batch, ctx: CheckContext) -> tuple[list[tuple[int, Outcome]], str]:
    """The task: check each ``(index, state, overlay runs)``; returns the outcomes and how states were made."""
    out: list[tuple[int, Outcome]] = []
    checker = ctx.checker
    _current.token = ctx.token
    if not checker.needs_file:
        base = _worker.bytes_of(ctx)
        for index, state, runs in batch:
            _stop_if_cancelled(ctx.token)
            overlay = Overlay(ctx.sector, runs)
            image = OverlayImage(base, overlay.sectors(ctx.pool, ctx.base.size), ctx.sector)
            out.append((index, checker.check_image(image, state)))
        return out, "overlay"
    scratch = _worker.scratch_for(ctx)
    for index, state, runs in batch:
        _stop_if_cancelled(ctx.token)
        overlay = Overlay(ctx.sector, runs)
        scratch.prepare(overlay, ctx.pool)
        try:
            out.append((index, checker.check_file(scratch.path, state)))
        finally:
            scratch.restore(overlay)
    return out, "reflink" if scratch.reflink else "copy-once+restore"


def _stop_if_cancelled(token: str) -> None:
    with _running_lock:
        if token in _cancelled:
            raise ExploreError("exploration cancelled")


def verify_checker(checker: Checker) -> tuple[str, str | None]:
    """Run on every worker before any state is built: this host's name, and why the checker cannot run here."""
    return socket.gethostname(), checker.verify()


def release(token: str) -> None:
    """Remove this process's scratch images and base copy of one exploration (run everywhere at the end)."""
    _worker.release(token)
