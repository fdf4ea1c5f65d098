"""Log output: the human text format (default) or one JSON object per line.

Owns: the log handler set-up of the CLI (``--log-format text|json``), the JSON
formatter, and the task id of the code that is logging (a context variable set
while a task runs, so every line about a task carries ``taskId``, also from the
worker threads of ``asyncio.to_thread``, which copy the context).

The audit record (logger ``runner.audit``) is one JSON line in both formats; in the
JSON format its fields are the line's fields, not a string inside it.

Must not import anything of the runner but the standard library.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_LOGGER = "runner.audit"
_HANDLER_NAME = "sandbox-runner"

current_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sandbox_runner_task_id", default=None
)
# The CLI's choice and start time, for output written outside logging (image build
# progress); context variables reach asyncio.to_thread workers, thread-locals do not.
current_log_format: contextvars.ContextVar[str] = contextvars.ContextVar(
    "sandbox_runner_log_format", default="text"
)
started_at: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "sandbox_runner_started_at", default=None
)

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskId"}


@contextmanager
def task_context(task_id: str) -> Iterator[None]:
    """Every log line inside the block (and its threads) carries ``taskId``."""
    token = current_task_id.set(task_id)
    try:
        yield
    finally:
        current_task_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, taskId, extras."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        parsed = _json_object(message) if record.name == AUDIT_LOGGER else None
        if parsed is not None:
            document.update(parsed)
        else:
            document["message"] = message
        task_id = getattr(record, "taskId", None) or current_task_id.get()
        if task_id and "taskId" not in document:
            document["taskId"] = task_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                document.setdefault(key, value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


class _TaskIdText(logging.Formatter):
    """The text format, with `` [task <id>]`` after the logger name inside a task."""

    def format(self, record: logging.LogRecord) -> str:
        task_id = getattr(record, "taskId", None) or current_task_id.get()
        line = super().format(record)
        if task_id and record.name != AUDIT_LOGGER and task_id not in record.getMessage():
            head, sep, tail = line.partition(f"{record.name}: ")
            if sep:
                return f"{head}{record.name} [task {task_id}]: {tail}"
        return line


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def setup_logging(*, level: int, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger (the CLI calls it); replaces a handler it added before,
    leaves anyone else's (pytest's capture) alone."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TaskIdText(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    current_log_format.set(log_format)
    started_at.set(time.monotonic())


__all__ = ["JsonFormatter", "current_task_id", "setup_logging", "task_context"]
