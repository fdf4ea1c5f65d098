"""The command line, ``sandbox-runner``: a module per command group, wiring beside them.

Owns nothing itself: ``main`` (:mod:`runner.cli.app`) is re-exported because it is
the console script's entry point (``runner.cli:main`` in pyproject.toml) and what
``python -m runner`` runs. The modules:

- :mod:`runner.cli.app`: the click group, global options, the command tree;
- :mod:`runner.cli.exec`, :mod:`runner.cli.image`, :mod:`runner.cli.policy`,
  :mod:`runner.cli.selfcheck`, :mod:`runner.cli.service`: one command group each;
- :mod:`runner.cli.support`: exit codes and the helpers the commands share;
- :mod:`runner.cli.wiring`: settings into pipelines, sandboxes and isolation.
"""

from runner.cli.app import main

__all__ = ["main"]
