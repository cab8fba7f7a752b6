"""``cachemode lab ...`` and ``cachemode crash ...``, and the ``--lab`` options ``cachemode serve`` applies."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cachemode.cli.console import unclipped
from cachemode.cli.options import SIZE, execution_options, json_file_option, write_cache_option
from cachemode.modes import Failure, get_mode, mode_names
from cachemode.units import format_size, plural

F = TypeVar("F", bound=Callable[..., Any])


# -- the options cachemode serve takes ------------------------------------------------------------------------
def lab_options(func: F) -> F:
    """``--lab`` and its knobs: --host-cache, --disk-cache, --writeback-after, --control, --record, --disk-flush."""
    opts = [
        click.option(
            "--disk-flush",
            "lab_disk_flush",
            type=click.Choice(["honour", "ignore"]),
            default=None,
            help="Lab: ignore = a device that acknowledges FLUSH and FUA without writing back (it lies) "
            "[default: honour].",
        ),
        click.option(
            "--record",
            "lab_record",
            type=click.Path(dir_okay=False),
            default=None,
            help="Lab: log every completed write, trim, zero, FLUSH and FUA to this file.",
        ),
        click.option(
            "--control",
            "lab_control",
            type=click.Path(dir_okay=False),
            default=None,
            help="Lab: Unix socket for 'cachemode lab power-cut|crash-process|status'.",
        ),
        click.option(
            "--writeback-after",
            "lab_writeback_after",
            type=float,
            default=None,
            help="Lab: write back data dirty for longer than SECONDS (default: never, deterministic).",
        ),
        click.option(
            "--disk-cache",
            "lab_disk_cache",
            type=SIZE,
            default=None,
            help="Lab: the device's volatile write cache [default: 64M; 0 = a device without one].",
        ),
        click.option(
            "--host-cache",
            "lab_host_cache",
            type=SIZE,
            default=None,
            help="Lab: dirty data the emulated host page cache holds before writing back [default: 256M].",
        ),
        click.option(
            "--lab",
            "lab",
            is_flag=True,
            help="Emulate the host page cache and the device's write cache in memory (power-loss lab).",
        ),
    ]
    for opt in opts:
        func = opt(func)
    return func


def lab_config_from_options(
    *,
    lab: bool,
    lab_host_cache: int | None = None,
    lab_disk_cache: int | None = None,
    lab_writeback_after: float | None = None,
    lab_control: str | None = None,
    lab_record: str | None = None,
    lab_disk_flush: str | None = None,
) -> Any:
    """The LabConfig the options ask for, or None without ``--lab`` (then no lab option may be given)."""
    from cachemode.lab.disk import LabConfig

    given = {
        "--host-cache": lab_host_cache,
        "--disk-cache": lab_disk_cache,
        "--writeback-after": lab_writeback_after,
        "--control": lab_control,
        "--record": lab_record,
        "--disk-flush": lab_disk_flush,
    }
    if not lab:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise click.UsageError(f"{', '.join(extra)} {'needs' if len(extra) == 1 else 'need'} --lab")
        return None
    defaults = LabConfig()
    return LabConfig(
        host_cache=defaults.host_cache if lab_host_cache is None else lab_host_cache,
        disk_cache=defaults.disk_cache if lab_disk_cache is None else lab_disk_cache,
        writeback_after=lab_writeback_after,
        record=lab_record,
        disk_flush=lab_disk_flush or defaults.disk_flush,
    )


def open_lab_from_options(
    image: str, cache: str, write_cache: bool, config: Any, create_size: int | None = None, read_only: bool = False
) -> Any:
    """Open IMAGE as a lab disk (what ``serve --lab`` serves)."""
    from cachemode.lab.disk import LabError, open_lab_disk

    if read_only:
        raise LabError("--lab cannot serve read-only: the lab emulates writes")
    return open_lab_disk(image, cache, config, write_cache=write_cache, create_size=create_size)


def start_control(disk: Any, path: str | None, server: Any = None) -> Any:
    """Start the control socket for a served lab disk; on a failure the server's connections are dropped."""
    if path is None:
        return None
    from cachemode.lab.control import ControlServer

    try:
        control = ControlServer(disk, path)
    except OSError as exc:  # ControlError (a CachemodeError) passes through
        from cachemode.lab.control import ControlError

        raise ControlError(f"{path}: cannot listen on the control socket: {exc.strerror or exc}") from None
    if server is not None:
        control.on_failure.append(lambda _cmd: drop_connections(server))
    return control.start()


def drop_connections(server: Any) -> None:
    """Abort every client connection of an NBD server (a crash takes them away)."""

    def abort() -> None:
        for conn in list(getattr(server, "_connections", ())):
            conn._abort()

    server.loop.call_soon_threadsafe(abort)


# -- output helpers -----------------------------------------------------------------------------------------
def _console() -> Any:
    from cachemode.cli.console import console

    return console()


def _write_json(data: Any, path: str | None) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2)
    if path == "-":
        click.echo(text)
        return
    try:
        with open(path, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        raise click.UsageError(f"--json {path}: {exc.strerror}") from None


def _mode_choice() -> click.Choice:
    return click.Choice(mode_names(), case_sensitive=False)


# -- cachemode lab ----------------------------------------------------------------------------------------------
@click.group()
def lab() -> None:
    """The power-loss lab: emulated host caches, power cuts, the durability matrix, SQLite under crashes."""


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"lab status (cache={status['mode']})")
    table.add_column("layer")
    table.add_column("capacity", justify="right")
    table.add_column("dirty bytes", justify="right")
    for layer in status["layers"]:
        table.add_row(layer["layer"], str(layer["capacity"]), str(layer["dirty_bytes"]))
    con = _console()
    con.print(table)
    con.print(
        f"writes acknowledged {status['writes_acknowledged']}, durable {status['writes_durable']}, "
        f"volatile {status['writes_volatile']}, lost {status['writes_lost']}; flushes {status['flushes']}, "
        f"FUA writes {status['fua_writes']}; power cuts {status['power_cuts']}, "
        f"process crashes {status['process_crashes']}"
    )


_control_option = click.option(
    "--control",
    "control",
    required=True,
    type=click.Path(dir_okay=False),
    help="The control socket of a 'cachemode serve --lab --control PATH'.",
)
_json_flag = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")


def _ask(control: str, request: dict[str, object], as_json: bool) -> dict | None:
    """Send one request to the control socket; print the reply as JSON and return None when asked to."""
    from cachemode.lab.control import send

    reply = send(control, request)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return None
    return reply


@lab.command("power-cut")
@_control_option
@click.option(
    "--survivors",
    type=click.Choice(["worst", "random"]),
    default="worst",
    show_default=True,
    help="worst: every volatile byte is lost; random: an arbitrary subset of dirty sectors lands.",
)
@click.option("--seed", type=int, default=None, help="Seed for --survivors random.")
@_json_flag
def power_cut(control: str, survivors: str, seed: int | None, as_json: bool) -> None:
    """Cut the power: the host page cache and the device cache are lost; the export serves what survived."""
    if seed is not None and survivors != "random":
        raise click.UsageError("--seed needs --survivors random")
    reply = _ask(control, {"cmd": "power-cut", "survivors": survivors, "seed": seed}, as_json)
    if reply is None:
        return
    lost = reply.get("lost_now", {})
    click.echo(
        f"power cut ({survivors}): {plural(lost.get('writes', 0), 'write')}, {plural(lost.get('bytes', 0), 'byte')} "
        "were only in volatile caches and are gone"
    )


@lab.command("crash-process")
@_control_option
@_json_flag
def crash_process(control: str, as_json: bool) -> None:
    """Kill the hypervisor process; the host lives, so its page cache and the device cache survive."""
    reply = _ask(control, {"cmd": "crash-process"}, as_json)
    if reply is None:
        return
    click.echo(
        f"process crashed: {reply['writes_volatile']} acknowledged writes still in the host's caches (they survive)"
    )


@lab.command("status")
@_control_option
@_json_flag
def status(control: str, as_json: bool) -> None:
    """Dirty bytes per emulated layer; writes acknowledged, durable, volatile, lost."""
    reply = _ask(control, {"cmd": "status"}, as_json)
    if reply is not None:
        _print_status(reply)


@lab.command("matrix")
@click.option("--host-cache", type=SIZE, default="256M", show_default=True, help="Emulated page cache size.")
@click.option(
    "--disk-cache", type=SIZE, default="64M", show_default=True, help="Device write cache (0 = a device without one)."
)
@write_cache_option("The guest-visible write cache (off: every write durable, except in unsafe).")
@click.option("--survivors", type=click.Choice(["worst", "random"]), default="worst", show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for --survivors random.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG heat map here.")
@json_file_option("the cells")
def matrix(
    host_cache: int,
    disk_cache: int,
    write_cache: str,
    survivors: str,
    seed: int | None,
    plot: str | None,
    json_path: str | None,
) -> None:
    """Measure, for every mode and failure, how many acknowledged writes are lost.

    Runs a built-in workload (writes, some flushed, some FUA, some not) on a fresh lab disk per cell, then a
    guest crash (the client vanishes without flushing), a process crash, or a power loss.
    """
    from rich.table import Table

    from cachemode.lab.disk import LabConfig
    from cachemode.lab.matrix import plot_matrix, run_matrix

    cells = run_matrix(
        LabConfig(host_cache=host_cache, disk_cache=disk_cache),
        write_cache=write_cache == "on",
        survivors=survivors,
        seed=seed,
    )
    table = Table(
        title=f"acknowledged writes lost (measured; device cache {format_size(disk_cache)}, "
        f"write-cache {write_cache}, survivors {survivors})"
    )
    table.add_column("mode")
    for f in Failure:
        table.add_column(f"{f.label}\nunflushed lost", justify="right")
        table.add_column(f"{f.label}\nflushed lost", justify="right")
    for mode in dict.fromkeys(c.mode for c in cells):
        row = [mode]
        for f in Failure:
            c = next(c for c in cells if c.mode == mode and c.failure == f.value)
            row += [f"{c.acked_unflushed_lost}/{c.acked_unflushed}", f"{c.flushed_lost}/{c.flushed}"]
        table.add_row(*row)
    if json_path != "-":
        _console().print(unclipped(table))
    _write_json([c.as_dict() for c in cells], json_path)
    if plot:
        try:
            plot_matrix(cells, plot)
        except OSError as exc:
            raise click.UsageError(f"--plot {plot}: {exc.strerror}") from None
        if json_path != "-":
            click.echo(f"heat map written to {plot}")


@lab.command("sqlite")
@click.option("--cache", type=_mode_choice(), default="writeback", show_default=True, help="Cache mode.")
@click.option(
    "--synchronous",
    type=click.Choice(["FULL", "NORMAL", "OFF", "EXTRA"], case_sensitive=False),
    default="FULL",
    show_default=True,
    help="SQLite's PRAGMA synchronous.",
)
@click.option("--states", type=click.IntRange(min=1), default=500, show_default=True, help="Crash states.")
@click.option(
    "--transfers",
    type=click.IntRange(min=1, max=2000),
    default=40,
    show_default=True,
    help="Bank-transfer transactions in the workload.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--sector", type=click.Choice(["512", "4096"]), default="512", show_default=True, help="Tear granularity."
)
@execution_options("Check states in N threads here (with --scheduler local: N worker processes) [default: 1].")
@json_file_option("the report")
def sqlite(
    cache: str,
    synchronous: str,
    states: int,
    transfers: int,
    seed: int,
    sector: str,
    jobs: int | None,
    scheduler: str | None,
    json_path: str | None,
) -> None:
    """Run real SQLite (a bank-transfer workload) on the lab disk, then check every crash state.

    Checks PRAGMA integrity_check, that the total balance is constant, and that every transaction whose
    COMMIT returned is present. Exit status 1 when a violation was found.
    """
    from cachemode.execution import open_executor
    from cachemode.lab.sqlite import sqlite_lab

    with open_executor(jobs, scheduler) as executor, _progress(states) as advance:
        work, report = sqlite_lab(
            cache,
            synchronous=synchronous,
            states=states,
            seed=seed,
            transfers=transfers,
            sector=int(sector),
            progress=advance,
            executor=executor,
        )
    data = {
        "workload": {
            "cache": work.mode,
            "synchronous": work.synchronous,
            "transfers": transfers,
            "commits": work.commits,
        },
        **report.as_dict(),
    }
    if json_path != "-":
        con = _console()
        _print_report(
            report, f"SQLite bank workload, cache={work.mode}, synchronous={work.synchronous}, {work.commits} commits"
        )
        if report.violations:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.violations.items()))
            con.print(f"VIOLATIONS in {report.failed} of {report.checked} states: {kinds}")
        else:
            con.print(f"no violation in {report.checked} crash states")
    _write_json(data, json_path)
    if report.failed:
        sys.exit(1)


# -- cachemode crash ------------------------------------------------------------------------------------------
@click.group()
def crash() -> None:
    """Crash-state exploration over a write log recorded with --record."""


class _progress:
    """A rich progress bar on a terminal, one line per phase (building, checking) with states/s; else nothing."""

    def __init__(self, total: int, what: str = "crash states") -> None:
        self.total = total
        self.what = what
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str, int, int], None]:
        if not sys.stderr.isatty():
            return lambda phase, done, total: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from cachemode.cli.console import console

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console(stderr=True),
            transient=True,
        )
        self.bar.start()

        def advance(phase: str, done: int, total: int) -> None:
            if phase not in self.tasks:
                self.tasks[phase] = self.bar.add_task(f"{phase} {self.what}", total=total, rate="")
            task = self.tasks[phase]
            self.bar.update(task, completed=done, total=total)
            speed = next(t.speed for t in self.bar.tasks if t.id == task)
            if speed:
                self.bar.update(task, rate=f"{speed:.1f} states/s")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_report(report: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("cache mode", report.mode),
        ("seed", str(report.seed)),
        ("tear granularity", f"{report.sector} B"),
        ("log entries / writes / barriers", f"{report.log_entries} / {report.log_writes} / {report.barriers}"),
        ("states generated", str(report.generated)),
        ("duplicates dropped", str(report.duplicates)),
        ("states checked", str(report.checked)),
        ("  prefix / subset / torn", " / ".join(str(report.by_kind[k]) for k in ("prefix", "subset", "torn"))),
        ("passed", str(report.passed)),
        ("failed", str(report.failed)),
        ("time per state (check)", f"{report.per_state_ms:.2f} ms"),
        ("time to build the states", f"{report.prepare_seconds:.2f} s"),
        ("materialised by", report.materialise),
        ("checked on", report.where),
    ]
    for what, value in rows:
        table.add_row(what, value)
    _console().print(unclipped(table))
    for failure in report.failures[:5]:
        state = failure["state"]
        click.echo(
            f"  failed: crash point {state['crash_point']} ({state['kind']}, "
            f"{state['durable_writes']} durable writes, {len(state['kept'])} kept, "
            f"{len(state['torn'])} torn): {failure['output'][:300]}"
        )
    if len(report.failures) > 5:
        click.echo(f"  ... and {len(report.failures) - 5} more failed states (all in --json)")


@crash.command("explore")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--base", required=True, type=click.Path(dir_okay=False), help="The image before the logged run.")
@click.option(
    "--cache",
    type=_mode_choice(),
    default="writeback",
    show_default=True,
    help="The mode whose crash states to build (writethrough/directsync: every write is a barrier; "
    "unsafe: no flush is).",
)
@click.option(
    "--check",
    "check",
    required=True,
    help="A built-in checker (ext4: journal replay, then e2fsck -fn) or a command; {image} is the crash state's image.",
)
@click.option("--states", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--sector", type=click.Choice(["512", "4096"]), default="512", show_default=True, help="Tear granularity."
)
@write_cache_option("The guest-visible write cache during the run; off: every write was durable (except in unsafe).")
@execution_options("Run N checkers at once here (with --scheduler local: N worker processes) [default: 1].")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds per checker run; a checker still running then is killed and the state fails as 'timeout'.",
)
@json_file_option("the report")
def explore_cmd(
    log: str,
    base: str,
    cache: str,
    check: str,
    states: int,
    seed: int,
    sector: str,
    write_cache: str,
    jobs: int | None,
    scheduler: str | None,
    timeout: float,
    json_path: str | None,
) -> None:
    """Build the crash states the mode allows from LOG, run the checker on each, report.

    Exit status 1 when a state failed the check.
    """
    from cachemode.execution import open_executor
    from cachemode.lab.checkers import resolve_checker
    from cachemode.lab.explore import explore
    from cachemode.lab.record import read_log

    checker = resolve_checker(check, timeout=timeout)
    wlog = read_log(log)
    mode = get_mode(cache)
    with open_executor(jobs, scheduler) as executor, _progress(states) as advance:
        report = explore(
            wlog,
            mode,
            base=base,
            checker=checker,
            states=states,
            seed=seed,
            sector=int(sector),
            executor=executor,
            write_cache=write_cache == "on",
            progress=advance,
        )
    if json_path != "-":
        _print_report(report, f"crash states of {log} (cache={mode.name})")
    _write_json({"log": log, "base": base, "check": check, **report.as_dict()}, json_path)
    if report.failed:
        sys.exit(1)


def serve_lab(
    image: str | None,
    cache: str,
    write_cache: bool,
    read_only: bool,
    create_size: int | None,
    config: Any,
    control: str | None,
    **listen: Any,
) -> None:
    """``cachemode serve IMAGE --lab ...``: serve a lab disk, with its control socket, until stopped."""
    from cachemode.cli.serving import run_server

    if image is None:
        raise click.UsageError("--lab needs an IMAGE")
    disk = open_lab_from_options(image, cache, write_cache, config, create_size, read_only)
    ctl = None
    try:
        ctl = start_control(disk, control)

        def ready(server: Any) -> None:
            if ctl is not None:
                ctl.on_failure.append(lambda _cmd: drop_connections(server))

        run_server(disk, on_ready=ready, **listen)
    finally:
        if ctl is not None:
            ctl.stop()
        disk.close()  # a clean shutdown of the emulated host: its caches are written back
