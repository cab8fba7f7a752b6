"""The ``cachemode`` command line: a layer above the parts, which never import it.

``disk``, ``nbd``, ``lab`` and ``cpu`` are libraries that import only downward (``lab`` uses ``disk``; ``nbd``
knows nothing of ``lab``); this package is where they meet the user. Each subcommand lives in a module here and
is imported only when invoked (the click group is :mod:`cachemode.cli.group`), so ``cachemode modes`` does not pay
for NumPy or asyncio start-up, and ``cachemode dinero``, whose start-up is part of its speed against Dinero IV,
does not even import click. Every user error ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

# NumPy's BLAS threads would spin beside the simulator's own; no command here does linear algebra
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every user error into one line and exit status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["dinero"]:
        _dinero(args[1:])
    from cachemode.cli.group import run

    run(argv)


def _dinero(args: list[str]) -> None:
    """``cachemode dinero``: Dinero IV's own option syntax, so click has nothing to parse (and is not imported)."""
    from cachemode.cpu.dinero import run_cli
    from cachemode.errors import CachemodeError

    try:
        run_cli(args)
    except CachemodeError as exc:
        print(f"cachemode: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)
