"""``sandbox-runner``: the click group, its global options and the entry point ``main``.

Owns: the command tree (each command lives in the module of its group, registered
here with ``main.add_command``), ``--verbose``, ``--log-format`` and ``--version``,
and the top-level help with the exit codes: 0 success, 1 the task (or check)
failed, 2 usage, configuration or infrastructure error (one human line on stderr,
never a traceback). Settings are built by each command, once, and passed down.
"""

from __future__ import annotations

import logging

import click

from runner import __version__
from runner.cli.exec import exec_command
from runner.cli.image import image
from runner.cli.policy import policy
from runner.cli.selfcheck import selfcheck
from runner.cli.service import broker, healthcheck, serve, sweep, up
from runner.logs import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sandbox-runner")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and retries to stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="SANDBOX_LOG_FORMAT",
    show_envvar=True,
    help="Log lines for people, or one JSON object per line (with the task id).",
)
def main(verbose: bool, log_format: str) -> None:
    """Run untrusted Python in hardened, short-lived containers, one per task.

    Results and reports a program reads are JSON on stdout; progress and logs go to
    stderr. Exit codes: 0 success, 1 the task (or check) failed, 2 usage,
    configuration or infrastructure error.
    """
    setup_logging(level=logging.DEBUG if verbose else logging.WARNING, log_format=log_format)


main.add_command(exec_command)
main.add_command(image)
main.add_command(sweep)
main.add_command(serve)
main.add_command(healthcheck)
main.add_command(broker)
main.add_command(up)
main.add_command(policy)
main.add_command(selfcheck)

__all__ = ["main"]
