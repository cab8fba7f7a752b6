"""Raw Linux system calls through libc's ``syscall(2)``, for the interfaces Python's os module lacks (native AIO,
io_uring): one libc handle for both, loaded on first use so a platform without it only loses those paths, and
one way to turn a failed call into an ``OSError`` that names it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any


@functools.cache
def syscall() -> Any:
    """libc's ``syscall`` (returns a C long; errno kept for :func:`checked`). Raises OSError where there is none."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    call = libc.syscall
    call.restype = ctypes.c_long
    return call


def checked(result: int, what: str) -> int:
    """``result`` of a system call, or OSError (errno and ``what``) when it failed."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
