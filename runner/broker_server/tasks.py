"""The broker's tasks: each task's record, the table of them, and their documents.

Owns: a task's record (:class:`BrokerTask`: its status, queued -> offered -> running
-> success/error, or ``dead`` when its retry policy gave up on it, the runner it went
to, its one pending deadline, its retry policy and failed attempts, the prints kept
for it, the settings it still holds and, once finished, its result document as JSON
text); why a queued task waits (a retry's back-off included), in words for people
and a code for programs (:class:`Waiting`); the caps on prints a runner reports
(:func:`keep_prints`); what a completion makes of a task (:func:`completion_body`:
the result checked against the caller's ``outputSchema``, or the error; a result
whose check is a worker's to make is parked on the task, :class:`ParkedResult`) and the
result document as JSON text (:func:`result_document`); and the table of tasks with
what each tenant keeps of its finished ones (:class:`TaskTable`: the newest, within
a count and a byte budget per tenant).

Data and rules only: the broker core (:mod:`runner.broker_server.core`) decides when
a task moves on. No I/O, no clock of its own.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from runner.broker_server.retry import AttemptError, RetryPolicy
from runner.broker_server.schemas import Deferred, trial_result, validate_result
from runner.broker_server.submission import TaskLimits, to_json
from runner.protocol.messages import TaskDone, TaskErrorMessage
from runner.sandbox.base import ErrorCode, Mode, Stage

log = logging.getLogger(__name__)

TASK_ID_ALPHABET = string.ascii_letters + string.digits + "_-"


def new_task_id() -> str:
    """n8n's broker uses nanoid(8); ours are longer so ids stay unique across restarts."""
    return "".join(secrets.choice(TASK_ID_ALPHABET) for _ in range(16))


# Between a task's id and its attempt in the id a runner sees; not in TASK_ID_ALPHABET,
# so the two parts never blur.
ATTEMPT_SEPARATOR = "."


def wire_id(task_id: str, attempt: int) -> str:
    """The task id runners see for ``attempt``: the task's own id for the first (what
    n8n's protocol and every earlier broker sent), ``<id>.<attempt>`` after. A runner
    still running an older attempt (its lease died with a broker) reports it under the
    old id, so its late result cannot pass for the current attempt's."""
    return task_id if attempt == 1 else f"{task_id}{ATTEMPT_SEPARATOR}{attempt}"


def parse_wire_id(wire: str) -> tuple[str, int]:
    """A runner's task id as (task id, attempt); an id not of that shape is attempt 1."""
    task_id, separator, attempt = wire.partition(ATTEMPT_SEPARATOR)
    if separator and attempt.isdigit() and int(attempt) > 1:
        return task_id, int(attempt)
    return wire, 1


class TaskStatus(StrEnum):
    QUEUED = "queued"
    OFFERED = "offered"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    # A task with a retry policy whose last allowed attempt failed with a code the
    # policy retries: a dead letter (GET /v1/tasks?status=dead), every attempt's error kept.
    DEAD = "dead"

    @property
    def is_finished(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.DEAD)


class WaitReason(StrEnum):
    """Why a queued task has not started yet (``waitReason.code`` in the API)."""

    NO_RUNNER = "no_runner"
    RUNNERS_BUSY = "runners_busy"
    TENANT_QUOTA = "tenant_quota"
    DRAINING = "draining"
    RETRY_BACKOFF = "retry_backoff"  # an attempt failed; the next one waits its back-off


# How to add a runner, for people who submitted a task to a broker nobody serves.
NO_RUNNER_HELP = (
    "Start one with `sandbox-runner serve`, N8N_RUNNERS_TASK_BROKER_URI set to this "
    "broker's URL and N8N_RUNNERS_AUTH_TOKEN to its auth token."
)


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a queued task waits, for people (``message``) and programs (``reason``)."""

    reason: WaitReason
    message: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.reason.value, "message": self.message}


class TaskTimer(StrEnum):
    """What happens when a task's deadline passes (a task has at most one at a time)."""

    ACCEPT = "accept"  # offered, no answer from the runner: back to the queue
    QUEUE = "queue"  # queued too long: queue_timeout
    RUN = "run"  # running past its timeout and the grace: the broker's taskcancel
    # Its runner left while running it and has not come back: the task ends runner_lost.
    RUNNER_LOST = ErrorCode.RUNNER_LOST.value
    # An attempt failed and its retry policy tries again: back to the queue.
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class ParkedResult:
    """A runner's result whose ``outputSchema`` check is a worker's to make (the inline
    trial did not settle it): the task stays running, with no timer, until the verdict
    comes back (:meth:`runner.broker_server.core.Broker.result_checked`)."""

    result: Any
    audit: Any


@dataclass
class BrokerTask:
    task_id: str
    tenant: str
    mode: Mode
    limits: TaskLimits
    submitted_at: float
    submitted_wall: datetime
    status: TaskStatus = TaskStatus.QUEUED
    runner_id: str | None = None
    offer_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    prints: list[list[str]] = field(default_factory=list)
    print_bytes: int = 0  # characters of the prints kept, for the broker's cap
    # Held while the task is unfinished (settings: until they are sent), counted in
    # its tenant's queued bytes; the result document once it has finished.
    settings: str | None = None
    output_schema: str | None = None
    document_json: str | None = None
    # The task's pending deadline (the broker's clock) and what it is for; None once
    # nothing is pending (always once it has finished).
    timer: TaskTimer | None = None
    deadline: float | None = None
    # Its lease's attempt: 1, plus one for each lease that died with a broker and for
    # each retry of its policy.
    attempt: int = 1
    # Its retry policy (None: one attempt, as n8n) and the errors of its failed attempts.
    retry: RetryPolicy | None = None
    attempts: list[AttemptError] = field(default_factory=list)
    # The Idempotency-Key it was submitted with, and the fingerprint of that request.
    idempotency_key: str | None = None
    fingerprint: str | None = None
    # Its result, in, while a worker checks it against outputSchema (None otherwise).
    parked: ParkedResult | None = None

    @property
    def wire_id(self) -> str:
        """The id runners know the current attempt by (:func:`wire_id`)."""
        return wire_id(self.task_id, self.attempt)

    @property
    def held_bytes(self) -> int:
        """Bytes of settings and schema this unfinished task still holds."""
        return len(self.settings or "") + len(self.output_schema or "")

    @property
    def document(self) -> dict[str, Any] | None:
        """The result document (decoded on every call: the API serves the text)."""
        if self.document_json is None:
            return None
        document: dict[str, Any] = json.loads(self.document_json)
        return document

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "taskId": self.task_id,
            "status": self.status.value,
            "mode": self.mode.value,
            "submittedAt": self.submitted_wall.isoformat(timespec="milliseconds"),
            "runnerId": self.runner_id,
        }
        if self.retry is not None:  # only then: a task without one shows what it always did
            summary["attempt"] = self.attempt
            summary["attempts"] = self.attempts_json()
        return summary

    def attempts_json(self) -> list[dict[str, Any]]:
        return [attempt.as_json() for attempt in self.attempts]


def waiting_for(
    task: BrokerTask,
    *,
    now: float,
    is_draining: bool,
    no_runner_since: float | None,
    active: int,
    quota: int,
) -> Waiting | None:
    """Why ``task`` has not started yet; None once it has (or has finished).

    ``now``: the broker's clock; ``no_runner_since``: when the broker last had no
    registered runner (None while it has one); ``active``: tasks of its tenant on
    runners; ``quota``: its tenant's.
    """
    if task.status is not TaskStatus.QUEUED:
        return None
    if task.timer is TaskTimer.RETRY and task.deadline is not None and task.attempts:
        failed = task.attempts[-1]
        return Waiting(
            WaitReason.RETRY_BACKOFF,
            f"Attempt {failed.attempt} failed ({failed.code}); its retry policy starts "
            f"attempt {task.attempt} in {max(0.0, task.deadline - now):.1f} s.",
        )
    if is_draining:
        return Waiting(WaitReason.DRAINING, "The broker is shutting down: it starts no more tasks.")
    if no_runner_since is not None:
        return Waiting(
            WaitReason.NO_RUNNER, f"No runner is connected to this broker. {NO_RUNNER_HELP}"
        )
    if active >= quota:
        return Waiting(
            WaitReason.TENANT_QUOTA,
            f"Tenant {task.tenant!r} already has its quota of {quota} tasks running.",
        )
    return Waiting(WaitReason.RUNNERS_BUSY, "Every connected runner is busy (no free slot).")


def expiry_cause(
    task: BrokerTask, waiting: Waiting, *, no_runner_since: float | None, now: float, quota: int
) -> str:
    """Why a task waited out its queue timeout, in a few words for the error message."""
    match waiting.reason:
        case WaitReason.NO_RUNNER:
            assert no_runner_since is not None
            if no_runner_since <= task.submitted_at:
                return "no runner was connected to this broker while it waited"
            gone_s = now - no_runner_since
            return f"no runner is connected to this broker (the last one left {gone_s:.0f} s ago)"
        case WaitReason.TENANT_QUOTA:
            return f"its tenant had its quota of {quota} tasks running"
        case WaitReason.DRAINING:
            return "the broker is shutting down"
        case _:
            return "every connected runner was busy"


def keep_prints(task: BrokerTask, entries: Any, max_calls: int, max_chars: int) -> int:
    """Keep print entries for ``task`` up to ``max_calls`` entries and ``max_chars``
    characters; return how many were dropped. What a runner reports is untrusted:
    ``entries`` (rpc params, or the report's ``prints`` under the sandbox-prints
    extension) that are not a list are dropped whole (one), and so is an entry that is
    not a list of strings; None is nothing to keep."""
    if entries is None:
        return 0
    if not isinstance(entries, list | tuple):
        return 1
    dropped = 0
    for entry in entries:
        if (
            len(task.prints) >= max_calls
            or not isinstance(entry, list | tuple)
            or not all(isinstance(arg, str) for arg in entry)
        ):
            dropped += 1
            continue
        size = sum(len(arg) for arg in entry)
        if task.print_bytes + size > max_chars:
            dropped += 1
            continue
        task.print_bytes += size
        task.prints.append(list(entry))
    if dropped:
        log.warning(
            "task %s: %d print entries beyond the broker's cap dropped",
            task.task_id,
            dropped,
            extra={"taskId": task.task_id},
        )
    return dropped


def error_body(message: str, description: str, code: str, stage: str) -> dict[str, Any]:
    """An error document's body (:func:`result_document` adds prints and audit).

    ``code``: an :class:`ErrorCode`, or the code a runner reported (passed on as it
    came); ``stage``: a :class:`Stage`, or the one a runner reported.
    """
    error = {"message": message, "description": description, "code": str(code), "stage": str(stage)}
    return {"status": "error", "error": error}


def completion_body(
    task: BrokerTask, message: TaskDone | TaskErrorMessage, *, defer: bool = False
) -> dict[str, Any] | None:
    """What a runner's completion makes of ``task``: its result, checked against the
    caller's ``outputSchema``, or its error with our report's code and stage.

    ``defer``: only a tiny check is made here
    (:func:`~runner.broker_server.schemas.trial_result`); a result it does not settle is
    parked on the task and None returned (the caller has the check made off the event
    loop, then :func:`checked_body`).
    """
    report = message.sandbox or {}
    if isinstance(message, TaskDone):
        result = message.data.result
        if not defer:
            schema = None if task.output_schema is None else json.loads(task.output_schema)
            return checked_body(result, validate_result(schema, result))
        problem = trial_result(task.output_schema, result)
        if isinstance(problem, Deferred):
            task.parked = ParkedResult(result, report.get("audit"))
            return None
        return checked_body(result, problem)
    error = message.error
    return error_body(
        error.message,
        error.description or "",
        str(report.get("code") or ErrorCode.TASK_ERROR),
        str(report.get("stage") or Stage.RUN),
    )


def checked_body(result: Any, problem: str | None) -> dict[str, Any]:
    """A result's body once checked against ``outputSchema`` (``problem``: None, it
    matches; else the first violation, or why the check refused it)."""
    if problem is None:
        return {"status": "success", "result": result}
    return error_body(
        "Result does not match outputSchema",
        problem,
        ErrorCode.OUTPUT_SCHEMA_VIOLATION,
        Stage.RESULT,
    )


def result_document(
    task: BrokerTask, body: dict[str, Any], audit: Any
) -> tuple[str, dict[str, Any]]:
    """The task's result document as JSON text, and the body it was made of.

    ``body``: ``{"status": "success", "result": ...}`` or ``{"status": "error", "error":
    {...}}``; the task's prints and the runner's ``audit`` are added, and for a task
    with a retry policy its failed attempts' errors (``attempts``). A report that is
    not JSON becomes an ``invalid_report`` error the caller can parse (its body is the
    one returned).
    """
    extra = {} if task.retry is None else {"attempts": task.attempts_json()}
    try:
        return to_json({**body, "prints": task.prints, "audit": audit, **extra}), body
    except (ValueError, TypeError, RecursionError) as exc:
        # Only a runner that breaks the protocol gets here (ours never sends NaN):
        # the caller gets an error it can parse, not invalid JSON.
        log.warning("task %s: the runner's report is not JSON: %s", task.task_id, exc)
        body = error_body(
            "The runner's report cannot be encoded as JSON",
            f"{type(exc).__name__}: {exc}"[:500],
            ErrorCode.INVALID_REPORT,
            Stage.RESULT,
        )
        return to_json({**body, "prints": [], "audit": None, **extra}), body


class TaskTable:
    """Every task the broker knows, by id; what each tenant keeps of its finished ones."""

    def __init__(self) -> None:
        self._tasks: dict[str, BrokerTask] = {}
        self._finished: dict[str, deque[str]] = {}  # tenant -> finished task ids, oldest first
        self._retained_bytes: dict[str, int] = {}  # tenant -> bytes of its kept documents
        # (tenant, Idempotency-Key) -> task id: as long as the task is kept.
        self._keys: dict[tuple[str, str], str] = {}

    def add(self, task: BrokerTask) -> None:
        self._tasks[task.task_id] = task
        if task.idempotency_key is not None:
            self._keys[(task.tenant, task.idempotency_key)] = task.task_id

    def get(self, task_id: str) -> BrokerTask | None:
        return self._tasks.get(task_id)

    def by_key(self, tenant: str, key: str) -> BrokerTask | None:
        """The task ``tenant`` submitted with Idempotency-Key ``key``, while it is kept."""
        task_id = self._keys.get((tenant, key))
        return None if task_id is None else self._tasks.get(task_id)

    def __getitem__(self, task_id: str) -> BrokerTask:
        return self._tasks[task_id]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def remove(self, task_id: str) -> None:
        """Forget a task at once (a shared store's: another broker holds it now, or it
        ended and is read from the store)."""
        task = self._tasks.pop(task_id, None)
        if task is not None and task.idempotency_key is not None:
            self._keys.pop((task.tenant, task.idempotency_key), None)

    def __iter__(self) -> Iterator[BrokerTask]:
        return iter(self._tasks.values())

    def recent(self, tenant: str, limit: int, status: TaskStatus | None = None) -> list[BrokerTask]:
        """The tenant's newest ``limit`` tasks (only those in ``status``, when given)."""
        mine = [
            t
            for t in self._tasks.values()
            if t.tenant == tenant and (status is None or t.status is status)
        ]
        return sorted(mine, key=lambda t: t.submitted_at, reverse=True)[:limit]

    def in_flight(self) -> list[BrokerTask]:
        """The tasks a runner has: offered or running."""
        return [
            t for t in self._tasks.values() if t.status in (TaskStatus.OFFERED, TaskStatus.RUNNING)
        ]

    def retain(self, task: BrokerTask, max_kept: int, max_bytes: int) -> list[str]:
        """Keep the tenant's last finished tasks; forget the oldest ones first. Returns
        the ids forgotten (with their idempotency keys).

        At most ``max_kept`` of them and ``max_bytes`` bytes of their documents; the
        newest is always kept, whatever its size (a document is bounded by what a
        runner may send), so its caller can read it once. Per tenant: one tenant's
        volume never evicts another's results.
        """
        tenant = task.tenant
        kept = self._finished.setdefault(tenant, deque())
        kept.append(task.task_id)
        retained = self._retained_bytes.get(tenant, 0) + len(task.document_json or "")
        forgotten = []
        while len(kept) > max_kept or (retained > max_bytes and len(kept) > 1):
            evicted = self._tasks.pop(kept.popleft(), None)
            if evicted is not None:
                retained -= len(evicted.document_json or "")
                forgotten.append(evicted.task_id)
                if evicted.idempotency_key is not None:
                    self._keys.pop((tenant, evicted.idempotency_key), None)
        self._retained_bytes[tenant] = retained
        return forgotten
