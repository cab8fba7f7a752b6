"""The ``cachemode`` command line: a layer above the parts, which never import it.

``disk``, ``nbd``, ``lab`` and ``cpu`` are libraries that import only downward (``lab`` uses ``disk``; ``nbd``
knows nothing of ``lab``); this package is where they meet the user. Each subcommand lives in a module here and
is imported only when invoked, so ``cachemode modes`` does not pay for NumPy or asyncio start-up. Every user
error ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# NumPy's BLAS threads would spin beside the simulator's own; no command here does linear algebra
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from cachemode.errors import CachemodeError

# name -> "module:attribute"; each attribute is a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "lab": "cachemode.cli.lab:lab",
    "crash": "cachemode.cli.lab:crash",
    "modes": "cachemode.cli.modes:modes",
    "disk": "cachemode.cli.modes:disk",
    "serve": "cachemode.cli.serve:serve",
    "demo": "cachemode.cli.demo:demo",
    "sim": "cachemode.cli.cpu:sim",
    "dinero": "cachemode.cli.cpu:dinero",
    "trace": "cachemode.cli.cpu:trace",
    "vm": "cachemode.cli.vm:vm",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cachemode")
def cli() -> None:
    """Understand, test and measure write caching: QEMU/KVM disk cache modes and CPU cache policies."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every user error into one line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="cachemode", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "cachemode"
        click.echo(f"{command}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except CachemodeError as exc:
        click.echo(f"cachemode: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)
