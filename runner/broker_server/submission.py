"""What a caller submits, and what the broker keeps of it: JSON text, encoded once.

Owns: a submission (:class:`Submission`, with its :class:`TaskLimits`) and what it
becomes at submission (:func:`prepare` -> :class:`Prepared`): plain items wrapped,
what cannot travel refused (:class:`SubmissionRefused`: too deep, ``NaN``), and the
runner's settings encoded as JSON text (:func:`to_json`), to
be spliced into the ``broker:tasksettings`` frame when the task is dispatched
(:func:`settings_frame`).

Memory is a tenant's to spend only within its budgets. A task's settings are encoded
once, at submission (what cannot be encoded or nests too deeply is refused there,
never at dispatch), and kept as that JSON text until they are sent; a finished task
keeps its result document as JSON text. As Python objects the same data would take up
to ~100 times its size in JSON (a dict per ``{}``), so a tenant could hold gigabytes
with one 16 MiB request; as ASCII-only JSON text (one byte per character), what the
byte budgets count is what the broker holds.

``inputSchema`` is applied before, by the API, in the schema workers
(:mod:`runner.broker_server.schema_pool`). Imports the protocol's messages and codec;
no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.broker_server.retry import RetryPolicy
from runner.errors import SubmissionRefused
from runner.protocol.codec import encode
from runner.protocol.messages import TaskSettingsMessage
from runner.sandbox.base import Mode

# Deepest nesting of ``query`` and of each item's ``json``. The runner re-encodes what
# a task returns with pydantic, which gives up at ~250 levels, and a task often returns
# its input wrapped in a few levels more; 128 leaves room for that and for any real
# workflow data.
MAX_INPUT_DEPTH = 128


@dataclass(frozen=True, slots=True)
class TaskLimits:
    timeout_s: float | None = None
    memory_mb: int | None = None
    cpus: float | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """A task as submitted through the API (``items``: n8n items or plain objects)."""

    tenant: str
    code: str
    items: list[Any]
    mode: Mode
    continue_on_fail: bool = False
    query: Any = None
    limits: TaskLimits = TaskLimits()
    output_schema: dict[str, Any] | None = None
    retry: RetryPolicy | None = None  # None: one attempt, as n8n


@dataclass(frozen=True, slots=True)
class Prepared:
    """A submission as the broker keeps it: the runner's settings already encoded.

    ``settings``: the ``settings`` object of ``broker:tasksettings`` as JSON text;
    ``output_schema``: the caller's schema as JSON, decoded again only to check a result.
    """

    tenant: str
    mode: Mode
    limits: TaskLimits
    settings: str
    output_schema: str | None = None
    retry: RetryPolicy | None = None

    @property
    def size_bytes(self) -> int:
        return len(self.settings) + len(self.output_schema or "")


def to_json(value: Any) -> str:
    """Compact JSON, ASCII only; never bare ``NaN`` (clients and Node refuse it).

    ASCII: one byte per character in memory, so ``len`` is what it costs (a string
    with one character beyond Latin-1 would take 2 or 4 bytes for every character),
    and lone surrogates (``"\\ud800"`` is valid JSON, but no UTF-8) travel as escapes.
    Raises ``ValueError`` (NaN, Infinity, a non-JSON value) or ``RecursionError``.
    """
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/objects in ``value`` nest more than ``limit`` levels (any depth).

    Level by level, with one list per level: a walk that made a tuple per node spent
    most of its time in the garbage collector on millions of small items.
    """
    level: list[Any] = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            below.extend([child for child in children if isinstance(child, dict | list)])
        level = below
    return False


def prepare(submission: Submission) -> Prepared:
    """Wrap plain items, check nesting, encode the settings.

    Raises :class:`SubmissionRefused` for what cannot travel: nesting beyond
    :data:`MAX_INPUT_DEPTH`, ``NaN``/``Infinity`` (Python's JSON parser accepts them;
    no JSON encoder should emit them). Whatever
    passes here is exactly what is sent, so a task can no longer fail to encode at
    dispatch and leave a runner's slot waiting. CPU-bound for large submissions (seconds
    for millions of values): the API calls it in a worker thread.
    """
    items = [
        item if isinstance(item, dict) and "json" in item else {"json": item}
        for item in submission.items
    ]
    for name, value in (("query", submission.query), ("items", items)):
        # items: the list and each {"json": ...} wrapper are two levels more.
        limit = MAX_INPUT_DEPTH + (2 if name == "items" else 0)
        if nests_deeper_than(value, limit):
            raise SubmissionRefused(
                f"{name} nests deeper than {MAX_INPUT_DEPTH} levels "
                f"{'in an item ' if name == 'items' else ''}(the broker's limit); "
                "flatten it or send it as a JSON string"
            )
    settings: dict[str, Any] = {
        "code": submission.code,
        "nodeMode": submission.mode.n8n_name,
        "items": items,
        "continueOnFail": submission.continue_on_fail,
        "workflowMode": "api",
        "workflowName": f"tenant {submission.tenant}",
        "nodeName": "sandbox-runner API",
        "query": submission.query,
        # Our runner applies this tenant's profile from its own bundle (n8n's never
        # gets a task from this broker; a runner that does not know the key ignores it).
        "tenant": submission.tenant,
    }
    limits = {
        key: value
        for key, value in (
            ("timeoutSeconds", submission.limits.timeout_s),
            ("memoryMb", submission.limits.memory_mb),
            ("cpus", submission.limits.cpus),
        )
        if value is not None
    }
    if limits:
        settings["limits"] = limits
    try:
        encoded = to_json(settings)
        schema = None if submission.output_schema is None else to_json(submission.output_schema)
    except (ValueError, TypeError, RecursionError) as exc:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else _plain(str(exc))
        raise SubmissionRefused(f"The task cannot be encoded as JSON: {reason}") from None
    return Prepared(
        submission.tenant, submission.mode, submission.limits, encoded, schema, submission.retry
    )


def _plain(message: str) -> str:
    if "Out of range float values" in message:
        return "NaN and Infinity are not JSON (send null or a string)"
    return message[:200]


def settings_frame(task_id: str, settings: str) -> str:
    """The ``broker:tasksettings`` frame around settings encoded at submission.

    The frame's envelope comes from the message model (its ``type`` is the only copy of
    the wire string); only the already-encoded ``settings`` is spliced in, so the
    task's data is never decoded or re-encoded on the way out.
    """
    envelope = encode(TaskSettingsMessage(task_id=task_id, settings=None))
    head, null, tail = envelope.rpartition("null")
    if not null or tail != "}":
        raise ValueError(f"unexpected broker:tasksettings envelope: {envelope!r}")
    return head + settings + tail
