"""The one place consoles and tables are made, so that no command ever cuts data.

Rich fits tables to the terminal and cuts cells with "…" when it runs short, and a pipe counts as an
80-column terminal. A mode name cut to ``writeba…`` is wrong data, so: piped output is plain text as wide as
the table needs, and on a narrow terminal cells fold onto more lines instead of being cut.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 1000
"""Width given to piped output: wider than any table, so each table takes its natural width."""


def console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width on a terminal, unlimited when piped."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(stderr=stderr, width=width, highlight=False)


def unclipped(table: Table) -> Table:
    """Make every column fold rather than cut when the terminal is too narrow; returns the table."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    return table


def print_table(table: Table, stderr: bool = False) -> None:
    """Print ``table`` without ever cutting a cell."""
    console(stderr).print(unclipped(table))
