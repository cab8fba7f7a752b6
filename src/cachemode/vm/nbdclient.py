"""The guest kernel as the NBD client: its own ``nbd`` module connected to the server, no QEMU block layer.

The guest reaches the host's loopback port through QEMU's user networking: a ``guestfwd`` maps
``10.0.2.100:10809`` in the guest to ``127.0.0.1:PORT`` on the host, and ``restrict=on`` allows nothing else.
Debian's ``nbd-client`` (with its shared libraries) does the handshake and hands the socket to the kernel.
What this shows: the Linux kernel's ``/sys/block/nbd0/queue/write_cache`` says "write back" exactly when the
server advertises SEND_FLUSH, and an fsync makes it send FLUSH only then.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from cachemode.disk import open_disk
from cachemode.modes import get_mode
from cachemode.vm.guest import Guest, build_initramfs
from cachemode.vm.kernel import GuestKernel, find_kernel
from cachemode.vm.labserver import serve_disk
from cachemode.vm.qemu import GuestNet, choose_accel, command_line, qemu_binary
from cachemode.vm.workloads import NBD_GUEST_ADDRESS, NBD_GUEST_PORT

EXPORT = "disk"
PATTERN_BYTES = 256 * 1024


def kernel_client_run(
    mode: str,
    write_cache: bool = True,
    *,
    kernel: GuestKernel | None = None,
    accel: str = "auto",
    timeout: float = 180.0,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Serve a fresh image in ``mode``, let the guest kernel connect, write 256 KiB with O_DIRECT and fsync."""
    qemu_binary()
    kernel = kernel or find_kernel()
    with tempfile.TemporaryDirectory(prefix="cachemode-vm-nbd-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        initrd = work / "initrd-nbd.gz"
        build_initramfs(kernel, initrd, nbd_client=True)
        chosen = choose_accel(accel, kernel.vmlinuz, initrd)
        image = work / "nbd.img"
        open_disk(image, "writeback", create_size=8 << 20).close()
        disk = open_disk(image, mode, write_cache=write_cache)
        # QEMU's guestfwd connects to the server when QEMU starts, not when the guest connects: the handshake
        # begins only once the guest has booted, so the server's 10 s handshake limit would drop a slow boot's
        # connection and leave the guest's nbd-client waiting on a dead forward.
        with serve_disk(disk, EXPORT, handshake_limit=timeout) as srv:
            argv = command_line(
                kernel=kernel.vmlinuz,
                initrd=initrd,
                append=f"cm.role=nbd cm.export={EXPORT}",
                accel=chosen,
                net=GuestNet(NBD_GUEST_ADDRESS, NBD_GUEST_PORT, srv.port),
            )
            guest = Guest(argv, console_log=work / "console-nbd.log")
            try:
                guest.read_until(lambda e: e == "done", timeout)
            finally:
                guest.kill()
            flushes = srv.stats.flushes
        disk.close()
        ready = next((e for e in guest.events if e.startswith("ready ")), "")
        step = next((e.split() for e in guest.events if e.startswith("step ")), [])
        on_disk = hashlib.md5(image.read_bytes()[:PATTERN_BYTES]).hexdigest()
    advertised = get_mode(mode).guest_write_cache(write_cache)
    return {
        "mode": get_mode(mode).name,
        "write_cache": write_cache,
        "send_flush_advertised": advertised,
        "guest_write_cache": ready.partition("write_cache=")[2].replace("_", " ") or None,
        "flushes_received": flushes,
        "data_round_trip": bool(step) and step[-1] == on_disk,
        "accel": chosen,
    }
