"""Click commands for the CPU cache simulator: ``sim`` (with ``sim sweep``), ``dinero`` and ``trace``."""

from __future__ import annotations

import sys

import click

from cachemode.cli.options import execution_options
from cachemode.cpu.config import ConfigError, hierarchy_from_specs, load_toml, parse_size
from cachemode.cpu.trace import FORMATS

LEVEL_HELP = (
    "A cache, repeatable, nearest the CPU first: [lN-]T:SIZE:BSIZE:ASSOC[:key=value...] with T = u, i or d, "
    "ASSOC a number or 'full', keys repl=lru|fifo|random|plru, walloc=a|n|f, wback=a|n|f, ralloc=a|n, "
    "seed=N, and a bare 'ccc' for 3C miss classification. Example: --level i:32k:64:8 --level d:32k:64:8 "
    "--level u:1m:64:16"
)


class _DefaultGroup(click.Group):
    """``sim TRACE ...`` runs the simulation; ``sim sweep ...`` the sweep. ``sim``, ``sim -h`` and ``sim --help``
    show the simulation's help (which names the sweep), since that is the form users type."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] in ("-h", "--help"):
            args[:] = ["run", "--help"]
        elif args[0] not in self.commands:
            args.insert(0, "run")
        return super().parse_args(ctx, args)


class _SimCommand(click.Command):
    """The default ``sim`` command: its usage line reads as users type it, without the hidden ``run``."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("cachemode sim", "TRACE (--level SPEC ... | --config FILE) [OPTIONS]")
        formatter.write_usage("cachemode sim", "sweep TRACE [OPTIONS]   (see cachemode sim sweep --help)")


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def sim() -> None:
    """Trace-driven CPU cache simulation: `sim TRACE --level ...` or `sim sweep TRACE ...`."""


@sim.command("run", cls=_SimCommand)
@click.argument("trace_path", metavar="TRACE")
@click.option("--level", "levels", multiple=True, metavar="SPEC", help=LEVEL_HELP)
@click.option("--config", "config", type=click.Path(dir_okay=False), metavar="FILE",
              help="Hierarchy in TOML ([[level]] tables).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Trace format (default: by suffix/content).")
@click.option("--flushcount", type=click.IntRange(min=0), default=0, metavar="N",
              help="Copy back and invalidate every N references.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Cores to use (default: CACHEMODE_THREADS or every core); counts do not depend on it.",
)
def run(
    trace_path: str,
    levels: tuple[str, ...],
    config: str | None,
    fmt: str | None,
    flushcount: int,
    as_json: bool,
    threads: int | None,
) -> None:
    """Simulate TRACE on a cache hierarchy and print a table per cache.

    TRACE is din, extended din, valgrind lackey, Dinero binary or .npz (by suffix, else by its first line),
    plain or compressed (gzip, xz, zstd), or - for stdin; it is read in chunks, so any length fits in memory.

    \b
    Examples:
      cachemode sim mm.xdin --level u:8k:64:4
      cachemode sim mm.xdin --level i:32k:64:8 --level d:32k:64:8:ccc --level u:1m:64:16 --json
      cachemode sim sweep mm.xdin --sizes 4k,8k,16k --assoc 1,2,full
    """
    from cachemode.cpu.simulate import simulate

    if config and levels:
        raise click.UsageError("give either --config or --level, not both")
    if config:
        hierarchy = load_toml(config)
    elif levels:
        hierarchy = hierarchy_from_specs(list(levels))
    else:
        raise click.UsageError("no caches: give --level SPEC (e.g. --level u:32k:64:8) or --config FILE")
    result = simulate(hierarchy, trace_path, fmt=fmt, flushcount=flushcount, threads=threads)
    for line in result.warnings():
        click.echo(f"cachemode sim: warning: {line}", err=True)
    if as_json:
        click.echo(result.to_json(indent=2))
        return
    from cachemode.cli.console import print_table

    print_table(result.table())


def _size_list(value: str, what: str) -> list[int]:
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if what == "assoc" and part.lower() in ("full", "fa", "f"):
            out.append(0)
            continue
        out.append(parse_size(part, what))
    if not out:
        raise ConfigError(f"empty --{what} list")
    return out


@sim.command("sweep")
@click.argument("trace_path", metavar="TRACE")
@click.option("--sizes", default="1k,2k,4k,8k,16k,32k,64k", show_default=True, help="Comma-separated sizes.")
@click.option(
    "--assoc",
    "assocs",
    default="1,2,4,8,full",
    show_default=True,
    help="Comma-separated associativities ('full' = fully associative).",
)
@click.option("--block", default="64", show_default=True, help="Block size.")
@click.option("--repl", default="lru", show_default=True, help="lru, fifo, random or plru.")
@click.option("--walloc", default="a", show_default=True)
@click.option("--wback", default="a", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE", help="Write the curves to a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the points as JSON.")
@execution_options(
    "Simulate N points at once here (with --scheduler local: N worker processes) [default: every core].",
    jobs_alias="--workers",
)
def sweep_cmd(trace_path, sizes, assocs, block, repl, walloc, wback, fmt, plot_path, as_json, jobs, scheduler) -> None:
    """Miss-rate curves over cache size and associativity, using every core (or a Dask cluster)."""
    import json
    import os

    from rich.progress import Progress

    from cachemode.cpu.sweep import plot, sweep
    from cachemode.execution import open_executor

    size_list = _size_list(sizes, "size")
    assoc_list = _size_list(assocs, "assoc")
    with (
        open_executor(jobs or os.cpu_count() or 1, scheduler) as executor,
        Progress(transient=True, console=_stderr_console()) as prog,
    ):
        task = prog.add_task("simulating", total=None)

        def tick(done: int, total: int) -> None:
            # Here the trace streams through every cache (references so far); on a cluster, points are tasks.
            what = f"{done:,} of {total:,} points" if total else f"{done:,} references"
            prog.update(task, completed=done, total=total or None, description=what)

        points = sweep(
            trace_path,
            size_list,
            assoc_list,
            parse_size(block, "block size"),
            fmt=fmt,
            workers=jobs,
            executor=executor,
            progress=tick,
            repl=repl,
            walloc=walloc,
            wback=wback,
        )
    refs = points[0].stats.total_fetches if points else 0
    if plot_path:
        plot(points, plot_path, title=f"{trace_path}: {refs:,} references, {block}-byte blocks")
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "size": p.size,
                        "assoc": p.assoc or "full",
                        "miss_rate": p.miss_rate,
                        "misses": p.stats.total_misses,
                        "fetches": p.stats.total_fetches,
                    }
                    for p in points
                ],
                indent=2,
            )
        )
        return
    from rich.table import Table

    from cachemode.cli.console import print_table

    t = Table(title=f"miss rate, {refs:,} references")
    t.add_column("size", justify="right")
    cols = sorted({p.assoc for p in points}, key=lambda a: a or 1 << 62)
    for a in cols:
        t.add_column("full" if a == 0 else f"{a}-way", justify="right")
    grid = {(p.size, p.assoc): p.miss_rate for p in points}
    for s in sorted({p.size for p in points}):
        t.add_row(str(s), *[f"{grid[(s, a)]:.4f}" if (s, a) in grid else "-" for a in cols])
    print_table(t)
    if plot_path:
        click.echo(f"plot written to {plot_path}")


def _stderr_console():
    from cachemode.cli.console import console

    return console(stderr=True)


@click.command(
    "dinero",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def dinero(args: tuple[str, ...]) -> None:
    """Dinero IV compatible front end: reads the trace on stdin, prints Dinero IV's report (-help)."""
    from cachemode.cpu.dinero import run_cli

    run_cli(list(args))


@click.group("trace", context_settings={"help_option_names": ["-h", "--help"]})
def trace() -> None:
    """Record and convert memory traces."""


@trace.command("record", context_settings={"ignore_unknown_options": True})
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Output file: .lackey (raw), .npz (compact, held whole), .bin (Dinero binary), .din, else extended din; "
    "add .gz, .xz or .zst to compress.",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def record_cmd(output: str, cmd: tuple[str, ...]) -> None:
    """Record CMD's memory references through valgrind lackey: trace record -o FILE -- CMD ...

    CMD keeps its terminal (its output shows); the trace streams into FILE. Exits with CMD's status."""
    from cachemode.cpu.record import record

    refs, status, kind = record(list(cmd), output)
    what = "lines" if kind == "lackey" else "references"
    click.echo(f"{output}: {refs:,} {what} ({kind}); {cmd[0]} exited with status {status}", err=True)
    sys.exit(status if status >= 0 else 128 - status)


@trace.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Input format (default: by suffix/content).")
def convert_cmd(src: str, dst: str, fmt: str | None) -> None:
    """Convert a trace, streaming; the output format follows DST's suffix (.npz, .bin, .din, else extended
    din; .gz, .xz or .zst compresses). SRC may be compressed, or - for stdin."""
    from cachemode.cpu.trace import TraceReader
    from cachemode.cpu.writer import TraceWriter, output_kind

    if output_kind(dst) == "lackey":
        raise click.UsageError("cannot write lackey format; use .npz, .bin, .din or .xdin")
    with TraceReader(src, fmt) as reader, TraceWriter(dst) as out:
        for chunk in reader:
            out.write(chunk)
    click.echo(f"{dst}: {out.count:,} references ({out.kind})", err=True)


@trace.command("synth")
@click.argument("kind", type=click.Choice(["mm-naive", "mm-transposed", "mm-blocked", "stream", "strided", "random",
                                           "chase", "stencil"]))  # fmt: skip
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Output file (format by suffix, as for record).")  # fmt: skip
@click.option("-n", "n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Matrix or grid side (mm-*, stencil), or elements (stream).")  # fmt: skip
@click.option("--elem", type=click.IntRange(1, 65535), default=8, show_default=True, help="Element size in bytes.")
@click.option("--tile", type=click.IntRange(min=1), default=16, show_default=True, help="mm-blocked: tile side.")
@click.option("--size", default="1m", show_default=True, help="Array or pool size (strided, random, chase).")
@click.option("--stride", default="64", show_default=True, help="strided: bytes between loads.")
@click.option("--count", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="random, chase: references.")  # fmt: skip
@click.option("--node", default="64", show_default=True, help="chase: node size in bytes.")
@click.option("--passes", type=click.IntRange(min=1), default=None,
              help="strided: sweeps (default 4); stencil: sweeps (default 1).")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True, help="random, chase: generator seed.")
def synth_cmd(kind: str, output: str, **opts) -> None:
    """Write a classic workload's data references as a trace.

    \b
    mm-naive       matrix multiply, i-j-k order: B is walked down its columns
    mm-transposed  the same with B stored transposed: both operands walked along rows
    mm-blocked     the same in --tile x --tile blocks that stay in the cache
    stream         STREAM triad a[i] = b[i] + s*c[i] over -n elements
    strided        loads every --stride bytes over --size bytes, --passes times
    random         --count uniform random loads within --size bytes
    chase          --count dependent loads around a random cycle of --node-byte nodes in --size bytes
    stencil        5-point Jacobi sweeps over an -n x -n grid
    """
    from cachemode.cpu.synth import KINDS
    from cachemode.cpu.writer import TraceWriter

    for key in ("size", "stride", "node"):
        opts[key] = parse_size(opts[key], key)
    trace = KINDS[kind](opts)
    with TraceWriter(output) as out:
        out.write(trace)
    click.echo(f"{output}: {len(trace):,} references ({out.kind})", err=True)
