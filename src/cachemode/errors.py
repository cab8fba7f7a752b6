"""The project's error base class.

Every error that a user can cause (a bad argument, a missing file, a malformed trace line) derives from
:class:`CachemodeError`, so the CLI can print it as one line and exit with status 2 instead of a traceback.
"""


class CachemodeError(Exception):
    """A user-facing error: its message is complete and names the offending input."""

    exit_code = 2
