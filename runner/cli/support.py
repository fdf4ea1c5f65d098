"""Helpers every command module shares: settings, running, failing, progress, rendering.

Owns: the exit codes, turning a configuration error or a runner fault into one
human line on stderr (``fail``, ``settings``, ``run``), the progress and status
lines on stderr (plain text, or JSON log lines with ``--log-format json``), and the
text and JSON shapes the auditor-facing reports share (``wrap``, ``report_json``).

Exit codes: 0 success, 1 the task (or check) failed, 2 usage, configuration or
infrastructure error (one human line on stderr, never a traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from runner.errors import RunnerError
from runner.logs import JsonFormatter, current_log_format, started_at
from runner.settings import Settings, env_name, load_settings

EXIT_TASK_FAILED = 1
EXIT_FINDINGS = 1  # `policy lint` found an error, `selfcheck` a required guarantee missing
EXIT_USAGE = 2
WIDTH = 100  # the reports' text width

T = TypeVar("T")
log = logging.getLogger("runner")


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2."""
    click.echo(f"sandbox-runner: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def settings(overrides: dict[str, Any] | None = None) -> Settings:
    """The settings, built once per command; an invalid one ends the command (``fail``)."""
    try:
        return load_settings(overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if loc and loc[0] in Settings.model_fields:
            loc[0] = env_name(loc[0])  # the variable the operator set, not our field name
        where = ".".join(loc) or "settings"
        fail(f"invalid configuration: {where}: {first['msg']}")
    except ValueError as exc:  # e.g. an unreadable *_FILE
        fail(f"invalid configuration: {exc}")


def run(coroutine_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; runner faults become one line on stderr and exit code 2."""
    try:
        return asyncio.run(coroutine_factory())
    except RunnerError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as exc:  # a bug of ours: one line for the user, the traceback in the log
        log.debug("internal error", exc_info=True)
        fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")


def progress(message: str) -> None:
    """Image build progress on stderr: ``[image 12.3s] ...`` (since the command started),
    or a JSON log line with ``--log-format json`` (a log pipeline never sees a line it
    cannot parse). Called from worker threads too."""
    started = started_at.get()
    elapsed = time.monotonic() - started if started is not None else 0.0
    if current_log_format.get() == "json":
        record = logging.LogRecord("runner.image", logging.INFO, __file__, 0, message, None, None)
        record.elapsedS = round(elapsed, 1)
        click.echo(JsonFormatter().format(record), err=True)
    else:
        click.echo(f"[image {elapsed:.1f}s] {message}", err=True)


def say(message: str) -> None:
    """A status line for the operator on stderr (a JSON log line with ``--log-format json``)."""
    if current_log_format.get() == "json":
        record = logging.LogRecord("runner.cli", logging.INFO, __file__, 0, message, None, None)
        click.echo(JsonFormatter().format(record), err=True)
    else:
        click.echo(message, err=True)


def wrap(text: str, indent: str, first: str | None = None) -> str:
    """``text`` filled to the reports' width; ``first`` replaces the first line's indent."""
    return textwrap.fill(
        text,
        width=WIDTH,
        initial_indent=first if first is not None else indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    )


def report_json(document: object) -> str:
    """A report's ``--json`` document (``policy lint|explain``, ``selfcheck``)."""
    return json.dumps(document, ensure_ascii=False, indent=1)
