"""One crash run: a guest on the lab disk, a power cut after step N, and what the guest's filesystem kept.

The order matters and is fixed:

1. make (or take) the ext4 image; keep a copy of it as the base of the write log;
2. serve it with the lab, recording the write log;
3. boot the guest; it mounts the disk, runs the workload, reports each acknowledged step, and after step N
   prints ``cm: cut N`` and waits, so the cut lands where asked, not wherever an emulated guest ran on to;
4. read the lab's counters, SIGKILL QEMU (a clean exit would flush its drive), then cut the lab's power;
5. verify a copy of the crashed image on the host (journal replay, ``e2fsck -fn``, every file's content), then
   optionally boot a guest on the crashed image and list what it sees, and explore the recorded log.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachemode.lab.disk import LabConfig
from cachemode.modes import get_mode
from cachemode.vm import VmError
from cachemode.vm.guest import Guest, build_initramfs
from cachemode.vm.kernel import GuestKernel, find_kernel
from cachemode.vm.labserver import LabServer
from cachemode.vm.qemu import FileDisk, NbdDisk, choose_accel, command_line, qemu_binary
from cachemode.vm.verify import make_ext4, need_e2fsprogs, verify_image
from cachemode.vm.workloads import load_workload

MiB = 1 << 20


@dataclass
class RunOptions:
    """What ``cachemode vm run`` was asked for."""

    mode: str = "writeback"
    write_cache: bool = True
    disk_cache: int | None = None
    disk_flush: str = "honour"
    workload: str = "fsync-files"
    files: int = 40
    cut_after: int | None = None  # None: after the last step
    image: Path | None = None
    size: int = 32 * MiB
    record: Path | None = None
    explore_states: int | None = None
    keep: Path | None = None
    sqlite_sync: str = "FULL"
    programs: tuple[str, ...] = ()
    kernel: str | None = None
    modules: str | None = None
    accel: str = "auto"
    verify_boot: bool = True
    timeout: float = 300.0
    seed: int = 0


@dataclass
class Prepared:
    """What several runs can share: the kernel, the initramfs and the accelerator (built once)."""

    kernel: GuestKernel
    initrd: Path
    accel: str
    workload: str
    seconds: float = 0.0


def prepare(opts: RunOptions, directory: Path, *, nbd_client: bool = False) -> Prepared:
    """Check the tools, find the kernel, build the initramfs, choose KVM or TCG."""
    t0 = time.perf_counter()
    qemu_binary()
    need_e2fsprogs()
    kernel = find_kernel(opts.kernel, opts.modules)
    workload = load_workload(opts.workload)
    initrd = directory / "initrd.gz"
    build_initramfs(kernel, initrd, workload=workload, programs=opts.programs, nbd_client=nbd_client)
    accel = choose_accel(opts.accel, kernel.vmlinuz, initrd)
    return Prepared(kernel, initrd, accel, opts.workload, time.perf_counter() - t0)


def _steps(events: list[str]) -> list[tuple[int, str, str, str]]:
    out = []
    for event in events:
        parts = event.split()
        if len(parts) == 5 and parts[0] == "step":
            out.append((int(parts[1]), parts[2], parts[3], parts[4]))
    return out


def _append(opts: RunOptions, role: str) -> str:
    cut = "end" if opts.cut_after is None else str(opts.cut_after)
    return f"cm.role={role} cm.cut={cut} cm.files={opts.files} cm.sqlite_sync={opts.sqlite_sync}"


def run_vm(
    opts: RunOptions, prepared: Prepared | None = None, progress: Callable[[str], None] = lambda _msg: None
) -> dict[str, Any]:
    """Run the guest, cut the power after the asked step, verify; returns the JSON-ready result."""
    mode = get_mode(opts.mode)
    if opts.files < 1:
        raise VmError("--files must be at least 1")
    if opts.cut_after is not None and opts.cut_after < 1:
        raise VmError("--cut-after must be a step number >= 1, or end")
    if opts.keep is not None:
        opts.keep.mkdir(parents=True, exist_ok=True)
        work = opts.keep
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="cachemode-vm-")
        work = Path(cleanup.name)
    try:
        return _run(opts, mode.name, work, prepared or prepare(opts, work), progress)
    finally:
        if cleanup is not None:
            cleanup.cleanup()


def _run(opts: RunOptions, mode: str, work: Path, prep: Prepared, progress: Callable[[str], None]) -> dict[str, Any]:
    image = opts.image if opts.image is not None else work / "disk.img"
    if opts.image is None:
        make_ext4(image, opts.size)
    elif not image.is_file():
        raise VmError(f"--image {image}: no such image")
    record = opts.record
    if opts.explore_states is not None and record is None:
        record = work / "write.log"
    base = work / "base.img"
    if record is not None:
        shutil.copyfile(image, base)
    defaults = LabConfig()
    config = LabConfig(
        disk_cache=defaults.disk_cache if opts.disk_cache is None else opts.disk_cache,
        record=str(record) if record is not None else None,
        disk_flush=opts.disk_flush,
    )
    guest_wc = get_mode(mode).guest_write_cache(opts.write_cache)
    timings: dict[str, float] = {"prepare": round(prep.seconds, 2)}
    progress(f"booting the guest ({prep.accel}) on the lab disk, cache={mode}")
    with LabServer(image, mode, config, write_cache=opts.write_cache) as lab:
        argv = command_line(
            kernel=prep.kernel.vmlinuz,
            initrd=prep.initrd,
            append=_append(opts, "crash"),
            accel=prep.accel,
            disk=NbdDisk(lab.port, guest_wc),
        )
        guest = Guest(argv, console_log=work / "console-crash.log")
        try:
            cut = guest.read_until(lambda e: e.startswith("cut "), opts.timeout)
            status = lab.disk.status()
        finally:
            guest.kill()  # SIGKILL before the power cut: nothing QEMU holds gets flushed
        timings["guest_to_cut"] = round(guest.seconds, 2)
        after_kill = lab.disk.status()
        power = lab.disk.power_cut()
        flushes_received = lab.stats.flushes
    events = guest.events
    ready = next((e for e in events if e.startswith("ready ")), "")
    seen_wc = ready.partition("write_cache=")[2].replace("_", " ") or None
    steps = _steps(events)
    progress(f"power cut after step {cut.split()[1]}: verifying the crashed image")
    t0 = time.perf_counter()
    verdict = verify_image(image, work, steps, opts.sqlite_sync)
    timings["verify"] = round(time.perf_counter() - t0, 2)
    result: dict[str, Any] = {
        "mode": mode,
        "write_cache": opts.write_cache,
        "disk_cache": config.disk_cache,
        "disk_flush": config.disk_flush,
        "expected_guest_write_cache": "write back" if guest_wc else "write through",
        "guest_write_cache": seen_wc,
        "workload": prep.workload,
        "cut_requested": "end" if opts.cut_after is None else str(opts.cut_after),
        "cut_after": cut.split()[1],  # "end" when the workload had fewer steps than asked
        "steps": len(steps),
        "fsynced_total": verdict.totals["fsynced_total"],
        "fsynced_lost": verdict.totals["fsynced_lost"],
        "unsynced_total": verdict.totals["unsynced_total"],
        "unsynced_lost": verdict.totals["unsynced_lost"],
        "corrupt_files": verdict.corrupt_files,
        "fsck_clean": verdict.fsck_clean,
        "files": verdict.files,
        "lab": {
            "at_cut": status,
            "writes_acknowledged": after_kill["writes_acknowledged"],
            "writes_durable": after_kill["writes_durable"],
            "writes_volatile": after_kill["writes_volatile"],
            "flushes": after_kill["flushes"],
            "fua_writes": after_kill["fua_writes"],
            "flushes_received": flushes_received,
            "lost_at_power_cut": power["lost_now"],
        },
        "accel": prep.accel,
    }
    if not verdict.fsck_clean:
        result["fsck_output"] = verdict.fsck_output[-2000:]
    if verdict.sqlite is not None:
        result["sqlite"] = verdict.sqlite
    if opts.verify_boot:
        t0 = time.perf_counter()
        result["verify_boot"] = verify_boot(image, work, prep, opts, verdict.files)
        timings["verify_boot"] = round(time.perf_counter() - t0, 2)
    if opts.explore_states is not None and record is not None:
        t0 = time.perf_counter()
        result["explore"] = explore_log(record, base, mode, opts)
        timings["explore"] = round(time.perf_counter() - t0, 2)
    if record is not None and opts.record is not None:
        result["record"] = str(record)
    result["seconds"] = timings
    return result


def verify_boot(image: Path, work: Path, prep: Prepared, opts: RunOptions, host_view: dict[str, str]) -> dict[str, Any]:
    """Boot a guest on the crashed image (``snapshot=on``: it replays the journal in memory) and list its files."""
    argv = command_line(
        kernel=prep.kernel.vmlinuz,
        initrd=prep.initrd,
        append=_append(opts, "verify"),
        accel=prep.accel,
        disk=FileDisk(image),
    )
    guest = Guest(argv, console_log=work / "console-verify.log")
    try:
        guest.read_until(lambda e: e == "listed", opts.timeout)
    finally:
        guest.kill()
    seen = {}
    for event in guest.events:
        parts = event.split()
        if len(parts) == 4 and parts[0] == "file":
            seen[parts[1]] = {"md5": parts[2], "size": int(parts[3])}
    present_on_host = {name for name, state in host_view.items() if state != "lost"}
    present_in_guest = {name for name, info in seen.items() if info["size"] > 0 and name in host_view}
    return {"files_listed": len(seen), "agrees_with_host": present_on_host == present_in_guest, "files": seen}


def explore_log(record: Path, base: Path, mode: str, opts: RunOptions) -> dict[str, Any]:
    """``crash explore --check ext4`` over the run's write log (a lying device's log has no barriers)."""
    from cachemode.lab.checkers import Ext4Checker
    from cachemode.lab.explore import explore
    from cachemode.lab.record import read_log

    model = "unsafe" if opts.disk_flush == "ignore" else mode
    assert opts.explore_states is not None
    report = explore(
        read_log(record),
        get_mode(model),
        base=str(base),
        checker=Ext4Checker(),
        states=opts.explore_states,
        seed=opts.seed,
        write_cache=opts.write_cache,
        max_failures=5,
    )
    return {"model": model, **report.as_dict()}
