"""The click group behind ``cachemode``: each subcommand's module is imported on first use."""

from __future__ import annotations

import importlib
import sys

import click

from cachemode.cli import SUBCOMMANDS
from cachemode.errors import CachemodeError


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


def run(argv: list[str] | None) -> None:
    """Run the click group, turning every user error into one line and exit status 2."""
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
