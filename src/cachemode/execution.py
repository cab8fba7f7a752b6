"""Where parallel work runs: threads here (``--jobs N``), or Dask distributed (``--scheduler ADDRESS``).

One seam for crash exploration, SQLite state checking and cache sweeps. A caller hands over independent tasks
(a module-level function and its arguments) and gets ``(index, result)`` pairs back as tasks complete; it orders
the results itself, so the answer does not depend on where or in which order the tasks ran.

* :class:`LocalExecutor`: a thread pool. The work releases the GIL where it matters (checker subprocesses,
  C simulation kernels, SQLite), so threads share one copy of the data and start nothing.
* :class:`DaskExecutor`: tasks on a Dask cluster. Large read-only inputs are :meth:`~Executor.share`-d
  (scattered to every worker once), not sent with each task. A worker that dies has its tasks rescheduled by the
  scheduler; closing the executor (also on Ctrl-C) cancels what has not run. ``--scheduler local`` starts a
  ``LocalCluster`` of worker processes here. Dask is imported only by this class.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from cachemode.errors import CachemodeError


class ExecutionError(CachemodeError):
    """The work cannot run where it was asked to (no Dask installed, no scheduler at that address)."""


class Executor(ABC):
    """Runs independent tasks somewhere; see the module docstring."""

    workers: int  # how many tasks run at once (for sizing batches)
    remote: bool  # tasks run in other processes (maybe other machines): data must travel
    where: str  # for reports: "local, 2 threads" or "dask tcp://...: 4 workers"

    def share(self, value: Any) -> Any:
        """A handle for ``value`` to pass in tasks' arguments; each worker receives ``value`` once."""
        return value

    @abstractmethod
    def everywhere(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """Run ``fn(*args)`` once in every worker process; worker name -> result (for checks and clean-up)."""

    @abstractmethod
    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any) -> Iterator[tuple[int, Any]]:
        """Run ``fn(item, *shared)`` for every item; yield ``(index, result)`` in completion order.

        Leaving the iteration early (an exception, Ctrl-C) cancels the tasks that have not started.
        """

    @abstractmethod
    def close(self) -> None:
        """Release workers and connections."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """``jobs`` threads in this process."""

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise ExecutionError("--jobs must be at least 1")
        self.workers = jobs
        self.remote = False
        self.where = f"local, {jobs} thread{'s' if jobs > 1 else ''}"

    def everywhere(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        return {"local": fn(*args)}

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any) -> Iterator[tuple[int, Any]]:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cachemode")
        pending: dict[Future[Any], int] = {}
        try:
            pending = {pool.submit(fn, item, *shared): i for i, item in enumerate(items)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield pending.pop(fut), fut.result()
        finally:  # on an early exit the caller stops what is running (e.g. kills checker processes)
            pool.shutdown(wait=not pending, cancel_futures=True)

    def close(self) -> None:
        pass


class DaskExecutor(Executor):
    """Tasks on a Dask distributed cluster at ``address``, or on a new LocalCluster (``address == "local"``)."""

    def __init__(self, address: str, jobs: int | None = None) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ExecutionError(
                "--scheduler needs Dask distributed: pip install 'cachemode[dask]' (or distributed)"
            ) from None
        self.cluster = None
        try:
            if address == "local":
                self.cluster = LocalCluster(
                    n_workers=jobs or os.cpu_count() or 1,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                )
                self.client = Client(self.cluster)
            else:
                self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            if self.cluster is not None:
                self.cluster.close()
            raise ExecutionError(f"--scheduler {address}: cannot reach a Dask scheduler there ({exc})") from None
        info = self.client.scheduler_info()
        threads = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())
        if threads == 0:
            self.close()
            raise ExecutionError(f"--scheduler {address}: the cluster has no workers")
        self.workers = threads
        self.remote = True
        self.where = f"dask {self.client.scheduler.address}: {len(info['workers'])} workers, {threads} threads"

    def share(self, value: Any) -> Any:
        return self.client.scatter(value, broadcast=True, hash=False)

    def everywhere(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        return self.client.run(fn, *args)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        futures = [self.client.submit(fn, item, *shared, pure=False) for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        remaining = set(index)
        try:
            for fut in as_completed(futures):
                result = fut.result()
                remaining.discard(fut.key)
                yield index[fut.key], result
        finally:
            if remaining:
                self.client.cancel([f for f in futures if f.key in remaining], force=True)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def file_digest(path: str) -> str:
    """BLAKE2b of a file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def same_file_here(path: str, size: int, digest: str) -> bool:
    """Whether this process sees the file at ``path`` with this size and checksum (run on every worker)."""
    try:
        return os.stat(path).st_size == size and file_digest(path) == digest
    except OSError:
        return False


def shared_file(executor: Executor, path: str) -> str | None:
    """The file's digest when every worker reads the same file at ``path`` (so tasks may name it), else None
    (then its content must travel). Local threads share this process's files."""
    if not executor.remote:
        return ""
    digest = file_digest(path)
    seen = executor.everywhere(same_file_here, path, os.stat(path).st_size, digest)
    return digest if seen and all(seen.values()) else None


def open_executor(jobs: int | None = None, scheduler: str | None = None) -> Executor:
    """Threads here (``scheduler`` None), or Dask at ``scheduler`` (``"local"``: a LocalCluster of processes)."""
    if scheduler:
        return DaskExecutor(scheduler, jobs)
    return LocalExecutor(jobs or 1)
