"""``python -m runner`` is ``sandbox-runner``."""

from runner.cli import main

main()
