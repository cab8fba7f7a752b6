"""Click options shared by every command that opens a disk, so each spells them the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from cachemode.errors import CachemodeError
from cachemode.modes import DEFAULT_MODE, mode_names
from cachemode.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])


class SizeParam(click.ParamType):
    """A byte size such as ``4096``, ``64M`` or ``1G``."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except CachemodeError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()


def on_off(value: str) -> bool:
    return value == "on"


def write_cache_option(
    text: str = "The guest-visible write cache (QEMU write-cache=); off makes every write durable "
    "before it is acknowledged, except in unsafe.",
) -> Callable[[F], F]:
    """``--write-cache on|off``, the guest's switch (read it with :func:`on_off`)."""
    return click.option("--write-cache", type=click.Choice(["on", "off"]), default="on", show_default=True, help=text)


def disk_options(func: F) -> F:
    """``--cache MODE``, ``--write-cache on|off`` and ``--read-only``."""
    func = click.option("--read-only", is_flag=True, help="Open the image read-only.")(func)
    func = write_cache_option()(func)
    func = click.option(
        "--cache",
        "cache",
        type=click.Choice(mode_names(), case_sensitive=False),
        default=DEFAULT_MODE,
        show_default=True,
        help="Cache mode, as QEMU's -drive cache=.",
    )(func)
    return func


def execution_options(jobs_help: str, *, jobs_alias: str | None = None) -> Callable[[F], F]:
    """``--jobs N`` (local parallelism) and ``--scheduler ADDRESS`` (Dask; ``$CACHEMODE_SCHEDULER``), alike for
    every command whose work can run on a cluster (open them with :func:`cachemode.execution.open_executor`)."""

    def decorate(func: F) -> F:
        func = click.option(
            "--scheduler",
            envvar="CACHEMODE_SCHEDULER",
            default=None,
            metavar="ADDRESS",
            help="Run the work on the Dask cluster at ADDRESS (tcp://HOST:8786), or 'local' for a LocalCluster of "
            "--jobs processes here [env CACHEMODE_SCHEDULER; needs the 'dask' extra].",
        )(func)
        names = ["--jobs", *([jobs_alias] if jobs_alias else []), "jobs"]
        return click.option(*names, type=click.IntRange(min=1, max=1024), default=None, help=jobs_help)(func)

    return decorate


def json_file_option(what: str) -> Callable[[F], F]:
    """``--json FILE`` ('-' for stdout), stored as ``json_path``: where a command writes ``what`` as JSON."""
    return click.option(
        "--json", "json_path", default=None, metavar="FILE", help=f"Write {what} as JSON to FILE ('-': stdout)."
    )
