"""Allow ``python -m syncer``."""

from syncer.cli import main

main()
