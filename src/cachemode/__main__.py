"""Allow ``python -m cachemode``."""

from cachemode.cli import main

main()
