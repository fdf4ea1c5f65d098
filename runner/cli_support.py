"""Helpers shared by every command module: settings, running, failing, progress.

Exit codes: 0 success, 1 the task failed, 2 usage, configuration or infrastructure
error (one human line on stderr, never a traceback).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from runner.errors import RunnerError
from runner.logs import JsonFormatter, current_log_format, started_at
from runner.settings import Settings, env_name, load_settings

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2

T = TypeVar("T")
log = logging.getLogger("runner")


def _fail(message: str) -> NoReturn:
    click.echo(f"sandbox-runner: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if loc and loc[0] in Settings.model_fields:
            loc[0] = env_name(loc[0])  # the variable the operator set, not our field name
        where = ".".join(loc) or "settings"
        _fail(f"invalid configuration: {where}: {first['msg']}")
    except ValueError as exc:  # e.g. an unreadable *_FILE
        _fail(f"invalid configuration: {exc}")


def _run(coroutine_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; runner faults become one line on stderr and exit code 2."""
    try:
        return asyncio.run(coroutine_factory())
    except RunnerError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    except Exception as exc:  # a bug of ours: one line for the user, the traceback in the log
        log.debug("internal error", exc_info=True)
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")


def _progress(message: str) -> None:
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


def _say(message: str) -> None:
    """A status line for the operator on stderr (a JSON log line with ``--log-format json``)."""
    if current_log_format.get() == "json":
        record = logging.LogRecord("runner.cli", logging.INFO, __file__, 0, message, None, None)
        click.echo(JsonFormatter().format(record), err=True)
    else:
        click.echo(message, err=True)
