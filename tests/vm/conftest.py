"""What the guest tests need: QEMU, static busybox, e2fsprogs and the guest kernel (``cachemode vm setup``).

``make test`` installs the Debian packages and runs ``cachemode vm setup`` first, so on a fresh machine these
tests run; where a piece is missing and cannot be fetched, they skip naming it.
"""

from __future__ import annotations

import shutil

import pytest

from cachemode.vm import VmError
from cachemode.vm.kernel import GuestKernel, find_kernel, setup

BOOT_TIMEOUT = 150.0  # seconds a test lets one guest boot run before it is killed


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: {package})")
    try:
        return find_kernel()
    except VmError:
        pass
    try:
        return setup()
    except VmError as exc:
        pytest.skip(f"no guest kernel and 'cachemode vm setup' failed: {exc}")
