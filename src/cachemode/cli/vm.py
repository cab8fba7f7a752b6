"""``cachemode vm ...``: a real Linux guest under QEMU on the lab disk (see docs/vm.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cachemode.cli.console import print_table
from cachemode.cli.lab import _mode_choice, _write_json
from cachemode.cli.options import SIZE, json_file_option, on_off, write_cache_option

DEFAULT_TIMEOUT = 300.0


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _kernel_options(func: Any) -> Any:
    func = click.option(
        "--accel",
        type=click.Choice(["auto", "kvm", "tcg"]),
        default="auto",
        show_default=True,
        help="auto: KVM when a short probe boot works under it, else TCG.",
    )(func)
    func = click.option(
        "--modules",
        type=click.Path(file_okay=False),
        default=None,
        help="With --kernel: a folder of its uncompressed .ko modules (virtio, virtio_blk, nbd, ...).",
    )(func)
    func = click.option(
        "--kernel", type=click.Path(dir_okay=False), default=None, help="Boot this kernel (default: vm setup's)."
    )(func)
    return func


@click.group()
def vm() -> None:
    """A real Linux guest on the lab disk: pull the plug at a chosen step, see what its filesystem kept."""


@vm.command("setup")
@click.option("--force", is_flag=True, help="Download and unpack again even if the version is cached.")
def setup(force: bool) -> None:
    """Fetch the guest kernel once (Debian's cloud kernel, downloaded and unpacked, never installed)."""
    from cachemode.vm.initramfs import static_busybox
    from cachemode.vm.kernel import setup as fetch
    from cachemode.vm.qemu import qemu_binary

    qemu_binary()
    static_busybox()
    kernel = fetch(_progress, force=force)
    click.echo(f"guest kernel {kernel.version}: {kernel.vmlinuz}")


def _run_options(func: Any) -> Any:
    opts = [
        click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="Seconds per boot."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for --explore."),
        click.option(
            "--sqlite-sync",
            type=click.Choice(["FULL", "NORMAL", "OFF", "EXTRA"], case_sensitive=False),
            default="FULL",
            show_default=True,
            help="The sqlite workload's PRAGMA synchronous.",
        ),
        click.option(
            "--files",
            type=click.IntRange(min=1, max=10000),
            default=40,
            show_default=True,
            help="Steps in the workload (files, or SQLite commits).",
        ),
        click.option(
            "--workload",
            metavar="NAME|FILE",
            default="fsync-files",
            show_default=True,
            help="fsync-files, rename, direct, sqlite, or a shell script FILE run in the guest (see docs/vm.md).",
        ),
        click.option(
            "--disk-flush",
            type=click.Choice(["honour", "ignore"]),
            default="honour",
            show_default=True,
            help="ignore: a device that acknowledges FLUSH and FUA without writing back (it lies).",
        ),
        click.option(
            "--disk-cache",
            type=SIZE,
            default=None,
            help="The device's volatile write cache [default: 64M; 0 = a device without one].",
        ),
        _kernel_options,
    ]
    for opt in opts:
        func = opt(func)
    return func


def _cut(value: str) -> int | None:
    if value == "end":
        return None
    try:
        step = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a step number or 'end'", param_hint="--cut-after") from None
    if step < 1:
        raise click.BadParameter("a step number >= 1 or 'end'", param_hint="--cut-after")
    return step


@vm.command("run")
@click.option("--cache", type=_mode_choice(), default="writeback", show_default=True, help="Cache mode.")
@write_cache_option()
@_run_options
@click.option(
    "--cut-after", metavar="N|end", default="end", show_default=True, help="Cut the power after step N, or at the end."
)
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Use this ext4 image (it is changed).")
@click.option("--size", type=SIZE, default="32M", show_default=True, help="Size of the ext4 image made.")
@click.option("--record", type=click.Path(dir_okay=False), default=None, help="Keep the lab's write log here.")
@click.option("--explore", "explore", type=click.IntRange(min=1), default=None, help="Explore N crash states.")
@click.option(
    "--with", "programs", metavar="PROGRAM", multiple=True, help="Copy a host program and its libraries into the guest."
)
@click.option("--no-verify-boot", is_flag=True, help="Skip the boot that mounts the crashed image in a guest.")
@json_file_option("the result")
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Keep images, logs, consoles here.")
def run(
    cache: str,
    write_cache: str,
    cut_after: str,
    image: str | None,
    size: int,
    record: str | None,
    explore: int | None,
    programs: tuple[str, ...],
    no_verify_boot: bool,
    json_path: str | None,
    keep: str | None,
    **common: Any,
) -> None:
    """Boot a guest on the lab disk, run the workload, cut the power after step N, report what ext4 kept.

    Exit status 1 when an fsynced step was lost or the filesystem is not clean after journal replay.
    """
    from cachemode.vm.run import RunOptions, run_vm

    opts = RunOptions(
        mode=cache,
        write_cache=on_off(write_cache),
        cut_after=_cut(cut_after),
        image=Path(image) if image else None,
        size=size,
        record=Path(record) if record else None,
        explore_states=explore,
        keep=Path(keep) if keep else None,
        programs=programs,
        verify_boot=not no_verify_boot,
        **common,
    )
    result = run_vm(opts, progress=_progress if json_path != "-" else lambda _m: None)
    if json_path != "-":
        _print_run(result)
    _write_json(result, json_path)
    if result["fsynced_lost"] or not result["fsck_clean"]:
        sys.exit(1)


def _print_run(r: dict[str, Any]) -> None:
    from rich.table import Table

    title = f"cache={r['mode']} write-cache={'on' if r['write_cache'] else 'off'}"
    if r["disk_flush"] == "ignore":
        title += " on a device that ignores FLUSH/FUA"
    table = Table(title=f"{title}: power cut after step {r['cut_after']} ({r['workload']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    lab = r["lab"]
    rows = [
        ("guest write_cache (expected)", f"{r['guest_write_cache']} ({r['expected_guest_write_cache']})"),
        ("fsynced steps lost", f"{r['fsynced_lost']}/{r['fsynced_total']}"),
        ("unsynced steps lost", f"{r['unsynced_lost']}/{r['unsynced_total']}"),
        ("corrupt files", ", ".join(r["corrupt_files"]) or "none"),
        ("fsck after journal replay", "clean" if r["fsck_clean"] else "ERRORS"),
        (
            "lab at the cut",
            f"{lab['writes_acknowledged']} acked, {lab['writes_durable']} durable, {lab['writes_volatile']} volatile; "
            f"{lab['flushes']} flushes, {lab['fua_writes']} FUA",
        ),
    ]
    if "sqlite" in r:
        s = r["sqlite"]
        missing = f"{s['commits_missing']}/{s['commits_acknowledged']} commits missing"
        rows.append(("sqlite", f"integrity {s['integrity']}; {missing}"))
    if "verify_boot" in r:
        vb = r["verify_boot"]
        rows.append(("verify boot", f"{vb['files_listed']} files; agrees with host: {vb['agrees_with_host']}"))
    if "explore" in r:
        st = r["explore"]["states"]
        rows.append(("crash explore --check ext4", f"{st['failed']} of {st['checked']} states failed"))
    for what, value in rows:
        table.add_row(what, value)
    print_table(table)


@vm.command("matrix")
@_run_options
@click.option("--explore", "explore", type=click.IntRange(min=1), default=None, help="Explore N states per row.")
@click.option("--verify-boot", is_flag=True, help="Also boot a guest on each crashed image.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG bar chart here.")
@json_file_option("the rows")
def matrix(explore: int | None, verify_boot: bool, plot: str | None, json_path: str | None, **common: Any) -> None:
    """The real-guest durability table: every mode, write-cache off, no device cache, a lying device."""
    from cachemode.vm.matrix import plot_rows, run_matrix

    disk_cache = common.pop("disk_cache")
    disk_flush = common.pop("disk_flush")
    if disk_cache is not None or disk_flush != "honour":
        raise click.UsageError("vm matrix chooses --disk-cache and --disk-flush per row")
    rows = run_matrix(
        explore_states=explore,
        verify_boot=verify_boot,
        progress=_progress if json_path != "-" else lambda _m: None,
        **common,
    )
    if json_path != "-":
        _print_matrix(rows)
    _write_json(rows, json_path)
    if plot:
        try:
            plot_rows(rows, plot)
        except OSError as exc:
            raise click.UsageError(f"--plot {plot}: {exc.strerror}") from None


def _print_matrix(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="real guest (ext4), power cut at the end of the workload")
    for col in ("row", "guest sees", "fsynced lost", "unsynced lost", "corrupt", "fsck", "modes promises"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(
            r["row"],
            r["guest_write_cache"] or "?",
            f"{r['fsynced_lost']}/{r['fsynced_total']}",
            f"{r['unsynced_lost']}/{r['unsynced_total']}",
            str(len(r["corrupt_files"])),
            "clean" if r["fsck_clean"] else "ERRORS",
            r["promised"],
        )
    print_table(table)


@vm.command("nbd-client")
@click.option("--cache", type=_mode_choice(), default="writeback", show_default=True, help="Cache mode.")
@write_cache_option()
@_kernel_options
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="Seconds for the boot.")
@json_file_option("the result")
def nbd_client(
    cache: str,
    write_cache: str,
    kernel: str | None,
    modules: str | None,
    accel: str,
    timeout: float,
    json_path: str | None,
) -> None:
    """The guest kernel as the NBD client: what write_cache it shows, and whether an fsync sends FLUSH."""
    from cachemode.vm.kernel import find_kernel
    from cachemode.vm.nbdclient import kernel_client_run

    result = kernel_client_run(
        cache, on_off(write_cache), kernel=find_kernel(kernel, modules), accel=accel, timeout=timeout
    )
    if json_path != "-":
        click.echo(
            f"cache={result['mode']} write-cache={write_cache}: server advertises SEND_FLUSH "
            f"{'yes' if result['send_flush_advertised'] else 'no'}; guest kernel shows "
            f"'{result['guest_write_cache']}'; FLUSH received {result['flushes_received']}; "
            f"data round trip {'ok' if result['data_round_trip'] else 'FAILED'}"
        )
    _write_json(result, json_path)
