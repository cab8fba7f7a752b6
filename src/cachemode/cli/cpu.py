"""Click commands for the CPU cache simulator: ``sim`` (with ``sim sweep``), ``dinero`` and ``trace``."""

from __future__ import annotations

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
    """``sim TRACE ...`` runs the default subcommand; ``sim sweep ...`` the sweep."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args.insert(0, "run")
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def sim() -> None:
    """Trace-driven CPU cache simulation: `sim TRACE --level ...` or `sim sweep TRACE ...`."""


@sim.command("run")
@click.argument("trace_path", metavar="TRACE")
@click.option("--level", "levels", multiple=True, help=LEVEL_HELP)
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Hierarchy in TOML ([[level]] tables).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Trace format (default: by suffix/content).")
@click.option("--flushcount", type=int, default=0, help="Copy back and invalidate every N references.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
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
    """Simulate TRACE on a cache hierarchy and print a per-level table."""
    from cachemode.cpu.simulate import simulate
    from cachemode.cpu.trace import read_trace

    if config and levels:
        raise click.UsageError("give either --config or --level, not both")
    if config:
        hierarchy = load_toml(config)
    elif levels:
        hierarchy = hierarchy_from_specs(list(levels))
    else:
        raise click.UsageError("no caches: give --level SPEC (e.g. --level u:32k:64:8) or --config FILE")
    if flushcount < 0:
        raise click.UsageError("--flushcount must be >= 0")
    trace = read_trace(trace_path, fmt)
    result = simulate(hierarchy, trace, flushcount=flushcount, threads=threads)
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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the curves to a PNG.")
@click.option("--json", "as_json", is_flag=True)
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
    from cachemode.cpu.trace import read_trace
    from cachemode.execution import open_executor

    size_list = _size_list(sizes, "size")
    assoc_list = _size_list(assocs, "assoc")
    trace = read_trace(trace_path, fmt)
    with (
        open_executor(jobs or os.cpu_count() or 1, scheduler) as executor,
        Progress(transient=True, console=_stderr_console()) as prog,
    ):
        task = prog.add_task("simulating", total=len(size_list) * len(assoc_list))

        def tick(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        points = sweep(
            trace,
            size_list,
            assoc_list,
            parse_size(block, "block size"),
            executor=executor,
            trace_path=None if trace_path == "-" else trace_path,
            trace_format=fmt,
            progress=tick,
            repl=repl,
            walloc=walloc,
            wback=wback,
        )
    if plot_path:
        plot(points, plot_path, title=f"{trace_path}: {len(trace):,} references, {block}-byte blocks")
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

    t = Table(title=f"miss rate, {len(trace):,} references")
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

    run_cli(["-help" if arg in ("--help", "-h") else arg for arg in args])


@click.group("trace", context_settings={"help_option_names": ["-h", "--help"]})
def trace() -> None:
    """Record and convert memory traces."""


@trace.command("record", context_settings={"ignore_unknown_options": True})
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .lackey (raw), .npz (compact), .bin (Dinero binary), else extended din.",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def record_cmd(output: str, cmd: tuple[str, ...]) -> None:
    """Record CMD's memory references through valgrind lackey: trace record -o FILE -- CMD ..."""
    from cachemode.cpu.record import record, write_trace

    tr, status, raw = record(list(cmd))
    kind = write_trace(tr, raw, output)
    click.echo(f"{output}: {len(tr):,} references ({kind}); {cmd[0]} exited with status {status}", err=True)


@trace.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Input format (default: by suffix/content).")
def convert_cmd(src: str, dst: str, fmt: str | None) -> None:
    """Convert a trace; the output format follows DST's suffix (.npz, .bin, .lackey not allowed, else xdin)."""
    from cachemode.cpu.record import write_trace
    from cachemode.cpu.trace import read_trace

    if dst.lower().endswith(".lackey"):
        raise click.UsageError("cannot write lackey format; use .npz, .bin or .xdin")
    tr = read_trace(src, fmt)
    kind = write_trace(tr, b"", dst)
    click.echo(f"{dst}: {len(tr):,} references ({kind})", err=True)
