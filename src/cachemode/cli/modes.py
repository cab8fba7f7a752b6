"""Commands about the cache modes themselves and the virtual disk: ``cachemode modes``, ``cachemode disk``."""

from __future__ import annotations

import json

import click
from rich import box
from rich.table import Table

from cachemode.cli.console import console as make_console
from cachemode.cli.console import print_table
from cachemode.cli.options import SIZE, disk_options, on_off, write_cache_option
from cachemode.modes import MODES, Failure
from cachemode.units import format_size


def _yes(flag: bool, yes: str = "yes", no: str = "no") -> str:
    return f"[green]{yes}[/]" if flag else f"[red]{no}[/]"


def _safe(flag: bool) -> str:
    return "[green]safe[/]" if flag else "[red]lost[/]"


def mode_table(write_cache: bool = True) -> Table:
    """The semantics table, rendered from :data:`cachemode.modes.MODES` and nothing else."""
    title = "QEMU/KVM disk cache modes" + ("" if write_cache else " (guest write cache off)")
    caption = (
        "write cache: what the guest is told (NBD SEND_FLUSH/SEND_FUA). FLUSH: sync = fdatasync. Failure "
        "columns: acknowledged-but-unflushed/flushed writes after it; lost = may be lost. Unspecified = writeback."
    )
    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("mode", no_wrap=True)
    table.add_column("write\ncache", no_wrap=True)
    table.add_column("open(2)\nO_...", no_wrap=True)
    table.add_column("FLUSH", no_wrap=True)
    for failure in Failure:
        table.add_column(failure.label.replace(" ", "\n", 1), no_wrap=True)
    for mode in MODES:
        name = "|".join((mode.name, *mode.aliases))
        flushes = "dropped" if mode.no_flush else ("sync" if mode.flush_syncs(write_cache) else "no-op")
        cells = [
            name,
            _yes(mode.guest_write_cache(write_cache)),
            "\n".join(f.removeprefix("O_") for f in mode.open_flags) or "-",
            flushes,
        ]
        for failure in Failure:
            s = mode.survival(failure, write_cache)
            cells.append(f"{_safe(s.acked)}/{_safe(s.flushed)}")
        table.add_row(*cells)
    return table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per mode, instead of a table.")
@write_cache_option("Show the table as it is with the guest's write cache switched on or off.")
def modes(as_json: bool, write_cache: str) -> None:
    """Print the cache-mode table: flags, what the guest is told, what each failure can lose."""
    enabled = on_off(write_cache)
    if as_json:
        click.echo(json.dumps([m.as_dict(enabled) for m in MODES], indent=2))
        return
    print_table(mode_table(enabled))


@click.group()
def disk() -> None:
    """Open an image as a virtual disk and look at it."""


@disk.command()
@click.argument("image", type=click.Path(dir_okay=False))
@disk_options
@click.option("--create", "create_size", type=SIZE, default=None, help="Create a sparse image of SIZE first.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(image: str, cache: str, write_cache: str, read_only: bool, create_size: int | None, as_json: bool) -> None:
    """Open IMAGE in a cache mode and show its layer stack, open flags, alignment and allocation map."""
    from cachemode.disk import open_disk
    from cachemode.disk.image import fd_flags, flag_names

    with open_disk(image, cache, write_cache=on_off(write_cache), read_only=read_only, create_size=create_size) as d:
        extents = d.block_status(0, d.size)
        report = {
            "image": image,
            "size": d.size,
            "mode": d.mode.name,
            "write_cache": d.write_cache,
            "guest_write_cache": d.guest_write_cache,
            "open_flags": flag_names(fd_flags(d.image.fd)),
            "alignment": d.alignment,
            "stack": d.describe(),
            "map": [{"offset": e.offset, "length": e.length, "hole": bool(e.flags & 1)} for e in extents],
        }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = make_console()
    console.print(
        f"[bold]{image}[/]: {format_size(report['size'])}, cache={report['mode']}, "
        f"open flags {' '.join(report['open_flags']) or '(none)'}, alignment {report['alignment']}"
    )
    console.print("guest told of a write cache: " + _yes(report["guest_write_cache"]))
    for depth, line in enumerate(report["stack"]):
        console.print("  " * depth + ("└─ " if depth else "") + line, markup=False)
    for e in extents[:20]:
        console.print(f"  {e.offset:>14} {e.length:>14}  {'hole' if e.flags & 1 else 'data'}")
    if len(extents) > 20:
        console.print(f"  ... {len(extents) - 20} more extents")
