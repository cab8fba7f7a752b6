"""The QEMU command line for the guest, and the choice between KVM and TCG.

The lab disk is reached over NBD with ``-blockdev driver=nbd`` and a ``virtio-blk-pci`` device whose
``write-cache`` is what the mode gives the guest (QEMU's ``cache.writeback``): virtio-blk shows the guest a
write-back cache from QEMU's own setting, whatever the server advertises, so QEMU must be told. QEMU adds no
semantics of its own: ``cache.direct`` and ``cache.no-flush`` stay off, so every guest flush the server
accepts (SEND_FLUSH) reaches it, and the server is the one place where the mode lives.

KVM is used only where it works: ``/dev/kvm`` can exist and still fail (a nested host aborts on ``-cpu host``
or hangs after the BIOS), so a short boot is tried once and its verdict cached; otherwise TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cachemode.vm import VmError

QEMU = "qemu-system-x86_64"
QEMU_HINT = f"{QEMU} not found: install qemu-system-x86 (apt-get install --no-install-recommends qemu-system-x86)"
KVM_PROBE_SECONDS = 8.0


def qemu_binary() -> str:
    found = shutil.which(QEMU)
    if found is None:
        raise VmError(QEMU_HINT)
    return found


@dataclass(frozen=True)
class NbdDisk:
    """The lab disk as QEMU's NBD client sees it, and whether the guest is shown a write-back cache."""

    port: int
    write_cache: bool
    export: str = ""


@dataclass(frozen=True)
class FileDisk:
    """An image file opened by QEMU itself with ``snapshot=on``: the guest's writes never reach it."""

    path: Path


@dataclass(frozen=True)
class GuestNet:
    """User networking whose only way out is a forward from the guest's NBD address to a loopback port."""

    guest_address: str
    guest_port: int
    host_port: int


def command_line(
    *,
    kernel: Path,
    initrd: Path,
    append: str,
    accel: str,
    disk: NbdDisk | FileDisk | None = None,
    net: GuestNet | None = None,
    memory: str = "256",
) -> list[str]:
    """The argv that boots the guest with its serial console on stdout and exits when the guest reboots."""
    argv = [qemu_binary(), "-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-m",
        memory,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        # loglevel=3: kernel warnings (RCU stalls, clocksource complaints on a loaded host) would otherwise be
        # printed into the middle of the guest's "cm:" lines on the shared serial console
        f"console=ttyS0 panic=-1 quiet loglevel=3 {append}",
    ]
    if isinstance(disk, NbdDisk):
        argv += [
            "-blockdev",
            f"driver=nbd,node-name=d0,server.type=inet,server.host=127.0.0.1,server.port={disk.port},"
            f"export={disk.export},cache.direct=off,cache.no-flush=off",
            "-device",
            f"virtio-blk-pci,drive=d0,write-cache={'on' if disk.write_cache else 'off'}",
        ]
    elif isinstance(disk, FileDisk):
        argv += ["-drive", f"file={disk.path},format=raw,if=virtio,snapshot=on"]
    if net is not None:
        argv += [
            "-netdev",
            f"user,id=n0,restrict=on,guestfwd=tcp:{net.guest_address}:{net.guest_port}-tcp:127.0.0.1:{net.host_port}",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]
    return argv


def _probe_cache() -> Path:
    from cachemode.vm.kernel import cache_root

    return cache_root() / "accel.json"


def choose_accel(requested: str, kernel: Path, initrd: Path) -> str:
    """``tcg``/``kvm`` as asked; ``auto``: KVM if a short boot under it reaches ``/init``, else TCG (cached)."""
    if requested in ("tcg", "kvm"):
        return requested
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        return "tcg"
    key = f"{os.uname().release} {kernel}"
    cache = _probe_cache()
    try:
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            return str(known["accel"])
    except (OSError, ValueError, KeyError):
        pass
    argv = command_line(kernel=kernel, initrd=initrd, append="cm.role=probe", accel="kvm")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=KVM_PROBE_SECONDS, check=False)
        works = "cm: done" in proc.stdout
    except subprocess.TimeoutExpired:
        works = False
    accel = "kvm" if works else "tcg"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "accel": accel}) + "\n")
    except OSError:
        pass
    return accel
