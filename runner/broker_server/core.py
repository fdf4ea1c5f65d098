"""The broker's rules: runners, offers, tasks, tenants, fair dispatch, timers.

Owns: which runners are connected and what they offer, the task table and each
task's life (queued -> offered -> running -> finished), why a queued task waits (no
runner, busy runners, its tenant's quota), per-tenant queues with
quotas and round-robin fairness (one busy tenant cannot starve the others), the
2 s accept timeout, the broker-side task timeout (``broker:taskcancel``), late
results from a runner that reconnected, drain on shutdown, and the result
documents the HTTP API serves.

Memory is a tenant's to spend only within its budgets. A task's settings are encoded
once, at submission (:func:`prepare`: what cannot be encoded or nests too deeply is
refused there, never at dispatch), and kept as that JSON text until they are sent; a
finished task keeps its result document as JSON text. As Python objects the same data
would take up to ~100 times its size in JSON (a dict per ``{}``), so a tenant could
hold gigabytes with one 16 MiB request; as ASCII-only JSON text (one byte per
character), what the byte budgets count is what the broker holds.

It is driven by the web layer (:mod:`runner.broker_server.app`) through plain
method calls; each runner connection is an object with a non-blocking ``send``.
Timers use the event loop's ``call_later`` with an injected clock for deadlines.
Executes no code itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import string
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel

from runner.broker_server.schemas import validate_input, validate_result
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.codec import encode
from runner.protocol.messages import (
    EXTENSION_PRINTS,
    EXTENSION_SANDBOX,
    LOG_NODE_OUTPUT,
    Drain,
    InfoRequest,
    Rpc,
    RunnerInfo,
    RunnerRegistered,
    TaskAccepted,
    TaskCancel,
    TaskDeferred,
    TaskDone,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
    TaskRejected,
    TaskSettingsMessage,
)
from runner.sandbox.base import Mode

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 2.0
TIMED_OUT_REASON = "Task execution timed out"
NOT_WANTED_REASON = "Task is no longer wanted"
NOT_SENT_REASON = "The broker could not send the task's settings"
# Deepest nesting of ``query`` and of each item's ``json``. The runner re-encodes what
# a task returns with pydantic, which gives up at ~250 levels, and a task often returns
# its input wrapped in a few levels more; 128 leaves room for that and for any real
# workflow data.
MAX_INPUT_DEPTH = 128
TASK_ID_ALPHABET = string.ascii_letters + string.digits + "_-"


def new_task_id() -> str:
    """n8n's broker uses nanoid(8); ours are longer so ids stay unique across restarts."""
    return "".join(secrets.choice(TASK_ID_ALPHABET) for _ in range(16))


class TaskStatus(StrEnum):
    QUEUED = "queued"
    OFFERED = "offered"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.ERROR)


class WaitReason(StrEnum):
    """Why a queued task has not started yet (``waitReason.code`` in the API)."""

    NO_RUNNER = "no_runner"
    RUNNERS_BUSY = "runners_busy"
    TENANT_QUOTA = "tenant_quota"
    DRAINING = "draining"


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


class RunnerConnection(Protocol):
    """One connected runner, as the web layer gives it to the core."""

    runner_id: str

    def send(self, message: BaseModel) -> None: ...
    def send_frame(self, frame: str) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


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

    @property
    def size_bytes(self) -> int:
        return len(self.settings) + len(self.output_schema or "")


class SubmissionRefused(ValueError):
    """A submission the broker cannot take as it is (a 422: the message says why)."""


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


def prepare(submission: Submission, input_schema: dict[str, Any] | None = None) -> Prepared:
    """Wrap plain items, apply ``input_schema``, check nesting, encode the settings.

    Raises :class:`SubmissionRefused` for items that do not match the schema and for
    what cannot travel: nesting beyond :data:`MAX_INPUT_DEPTH`, ``NaN``/``Infinity``
    (Python's JSON parser accepts them; no JSON encoder should emit them). Whatever
    passes here is exactly what is sent, so a task can no longer fail to encode at
    dispatch and leave a runner's slot waiting. CPU-bound for large submissions (seconds
    for millions of values): the API calls it in a worker thread.
    """
    items = [
        item if isinstance(item, dict) and "json" in item else {"json": item}
        for item in submission.items
    ]
    problem = validate_input(input_schema, items)
    if problem is not None:
        raise SubmissionRefused(f"Items do not match inputSchema: {problem}")
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
    return Prepared(submission.tenant, submission.mode, submission.limits, encoded, schema)


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
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None

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
        return {
            "taskId": self.task_id,
            "status": self.status.value,
            "mode": self.mode.value,
            "submittedAt": self.submitted_wall.isoformat(timespec="milliseconds"),
            "runnerId": self.runner_id,
        }


@dataclass
class _Runner:
    connection: RunnerConnection
    registered: bool = False
    offers: dict[str, float] = field(default_factory=dict)  # offer id -> valid until (-1: never)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    default_timeout_s: float = 60.0
    accept_timeout_s: float = ACCEPT_TIMEOUT_S
    timeout_grace_s: float = 15.0
    queue_timeout_s: float = 300.0
    runner_lost_grace_s: float = 30.0
    tenant_quota: int = 4
    tenant_quotas: dict[str, int] = field(default_factory=dict)
    max_tasks_kept: int = 1000  # finished tasks kept per tenant (older ones are forgotten)
    max_unfinished_per_tenant: int = 1000  # queued + offered + running; more is a 429
    # What a runner reports is untrusted: the broker keeps at most this many print
    # entries and characters per task, whatever a runner (or a task that forged its
    # frames) sends; the rest is dropped and counted.
    max_print_calls: int = 100
    max_print_chars: int = 16 * 1024 * 1024
    # Bytes per tenant (SANDBOX_TENANT_QUEUED_BYTES, SANDBOX_TENANT_RETAINED_BYTES):
    # encoded settings and schemas of its unfinished tasks (a submission beyond it is
    # refused), and result documents of its finished ones (the oldest are forgotten).
    max_queued_bytes_per_tenant: int = 128 * 1024 * 1024
    max_retained_bytes_per_tenant: int = 128 * 1024 * 1024


class TenantBacklogFull(Exception):
    """A tenant already has ``max_unfinished_per_tenant`` tasks that have not finished,
    or their bytes would exceed its queued-bytes budget (both a 429: wait and retry)."""


class TaskTooLarge(Exception):
    """One task alone needs more than its tenant's queued-bytes budget (a 413)."""


class Broker:
    """All broker state. Call from the event loop only."""

    def __init__(
        self,
        config: BrokerConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        # Without a registry of the caller's, a private one (nobody scrapes it).
        self._metrics = metrics or BrokerMetrics(CollectorRegistry())
        self._metrics.watch(self.state)
        self._runners: dict[str, _Runner] = {}
        self._tasks: dict[str, BrokerTask] = {}
        self._queues: dict[str, deque[str]] = {}
        self._round_robin: deque[str] = deque()
        self._active: dict[str, int] = {}  # tenant -> offered + running
        self._unfinished: dict[str, int] = {}  # tenant -> queued + offered + running
        self._queued_bytes: dict[str, int] = {}  # tenant -> bytes its unfinished tasks hold
        self._retained_bytes: dict[str, int] = {}  # tenant -> bytes of its kept documents
        self._finished: dict[str, deque[str]] = {}  # tenant -> finished task ids, oldest first
        self._draining = False
        # When the broker last had no registered runner (None while it has one): a task
        # that waits longer than this has never had a runner to go to.
        self._no_runner_since: float | None = clock()
        # Set by drain(): the API's long-polls race it and answer with the current state.
        self.closing = asyncio.Event()
        self.log_messages = False
        self.message_log: list[tuple[str, dict[str, Any]]] = []  # (runner id, message), tests

    # -- runners ------------------------------------------------------------------------

    def runner_connected(self, connection: RunnerConnection) -> None:
        previous = self._runners.get(connection.runner_id)
        if previous is not None:
            previous.connection.close(1000, "replaced by a new connection with the same id")
        self._runners[connection.runner_id] = _Runner(connection)
        self._runners_changed()
        connection.send(InfoRequest())

    def runner_disconnected(self, connection: RunnerConnection) -> None:
        runner = self._runners.get(connection.runner_id)
        if runner is None or runner.connection is not connection:
            return
        del self._runners[connection.runner_id]
        self._runners_changed()
        for task in self._tasks.values():
            if task.runner_id != connection.runner_id or task.status.is_finished:
                continue
            if task.status is TaskStatus.OFFERED:
                self._requeue(task, "runner_disconnected")
            elif task.status is TaskStatus.RUNNING:
                # The runner may come back (same id) and report it; otherwise it is lost.
                self._arm(task, self.config.runner_lost_grace_s, self._runner_lost, task.task_id)
        self.dispatch()

    def _runners_changed(self) -> None:
        if any(runner.registered for runner in self._runners.values()):
            self._no_runner_since = None
        elif self._no_runner_since is None:
            self._no_runner_since = self._clock()

    def runner_message(self, connection: RunnerConnection, message: BaseModel) -> None:
        if self.log_messages:
            self.message_log.append(
                (connection.runner_id, message.model_dump(mode="json", by_alias=True))
            )
        runner = self._runners.get(connection.runner_id)
        if runner is None or runner.connection is not connection:
            return
        if not runner.registered and not isinstance(message, RunnerInfo):
            return  # n8n's broker ignores everything before runner:info
        match message:
            case RunnerInfo():
                runner.registered = True
                self._runners_changed()
                connection.send(RunnerRegistered(extensions=(EXTENSION_SANDBOX, EXTENSION_PRINTS)))
                if self._draining:
                    connection.send(Drain())
            case TaskOffer(offer_id=offer_id, valid_for=valid_for):
                self._metrics.offers.inc()
                if not self._draining:
                    until = -1.0 if valid_for < 0 else self._clock() + valid_for / 1000
                    runner.offers[offer_id] = until
                    self.dispatch()
            case TaskAccepted(task_id=task_id):
                self._accepted(connection.runner_id, task_id)
            case TaskRejected(task_id=task_id, reason=reason):
                self._declined(connection.runner_id, task_id, reason)
            case TaskDeferred(task_id=task_id):
                self._declined(connection.runner_id, task_id, "deferred by a launcher")
            case Rpc(task_id=task_id, name=name, params=params):
                task = self._tasks.get(task_id)
                if (
                    task is not None
                    and task.status is TaskStatus.RUNNING
                    and task.runner_id == connection.runner_id
                    and name == LOG_NODE_OUTPUT
                ):
                    self._keep_prints(task, [params])
            case TaskDone() | TaskErrorMessage():
                self._completed(connection.runner_id, message)
            case _:
                log.info("ignoring %s from runner %s", type(message).__name__, connection.runner_id)

    # -- tasks --------------------------------------------------------------------------

    def submit(self, submission: Submission | Prepared) -> BrokerTask:
        """Queue a task.

        Raises :class:`SubmissionRefused` (a :class:`Submission` that cannot be encoded),
        :class:`TenantBacklogFull` (too many unfinished tasks, or too many bytes of
        them) or :class:`TaskTooLarge` (more bytes than the tenant's budget, alone).
        """
        prepared = submission if isinstance(submission, Prepared) else prepare(submission)
        tenant = prepared.tenant
        cap = self.config.max_unfinished_per_tenant
        if self._unfinished.get(tenant, 0) >= cap:
            raise TenantBacklogFull(
                f"Tenant {tenant!r} already has {cap} unfinished tasks (the broker's limit); "
                "wait for some to finish or cancel some"
            )
        budget = self.config.max_queued_bytes_per_tenant
        size = prepared.size_bytes
        if size > budget:
            raise TaskTooLarge(
                f"The task takes {size} bytes as JSON (code, items, query and outputSchema), "
                f"more than the {budget} bytes a tenant may have queued "
                "(SANDBOX_TENANT_QUEUED_BYTES); send less data per task"
            )
        queued = self._queued_bytes.get(tenant, 0)
        if queued + size > budget:
            raise TenantBacklogFull(
                f"Tenant {tenant!r} already has {queued} bytes of unfinished tasks; "
                f"this one ({size} bytes) would exceed its budget of {budget} bytes "
                "(SANDBOX_TENANT_QUEUED_BYTES); wait for some to start or cancel some"
            )
        task = BrokerTask(
            task_id=new_task_id(),
            tenant=tenant,
            mode=prepared.mode,
            limits=prepared.limits,
            submitted_at=self._clock(),
            submitted_wall=datetime.now(UTC),
            settings=prepared.settings,
            output_schema=prepared.output_schema,
        )
        self._tasks[task.task_id] = task
        self._unfinished[tenant] = self._unfinished.get(tenant, 0) + 1
        self._queued_bytes[tenant] = queued + size
        self._metrics.submitted.inc()
        self._queue(task, front=False)
        self._arm(task, self.config.queue_timeout_s, self._queue_expired, task.task_id)
        self.dispatch()
        return task

    def get(self, task_id: str) -> BrokerTask | None:
        return self._tasks.get(task_id)

    def summary(self, task: BrokerTask) -> dict[str, Any]:
        """A task's state as the API shows it: ``waitReason`` while it is queued."""
        waiting = self.waiting(task)
        return {**task.summary(), "waitReason": waiting.as_json() if waiting else None}

    def waiting(self, task: BrokerTask) -> Waiting | None:
        """Why ``task`` has not started yet; None once it has (or has finished)."""
        if task.status is not TaskStatus.QUEUED:
            return None
        if self._draining:
            return Waiting(
                WaitReason.DRAINING, "The broker is shutting down: it starts no more tasks."
            )
        if self._no_runner_since is not None:
            return Waiting(
                WaitReason.NO_RUNNER, f"No runner is connected to this broker. {NO_RUNNER_HELP}"
            )
        tenant = task.tenant
        quota = self._quota(tenant)
        if self._active.get(tenant, 0) >= quota:
            return Waiting(
                WaitReason.TENANT_QUOTA,
                f"Tenant {tenant!r} already has its quota of {quota} tasks running.",
            )
        return Waiting(WaitReason.RUNNERS_BUSY, "Every connected runner is busy (no free slot).")

    def recent(self, tenant: str, limit: int) -> list[BrokerTask]:
        mine = [t for t in self._tasks.values() if t.tenant == tenant]
        return sorted(mine, key=lambda t: t.submitted_at, reverse=True)[:limit]

    def cancel(self, task: BrokerTask) -> None:
        if task.status.is_finished:
            return
        if task.status is TaskStatus.QUEUED:
            self._unqueue(task)
            self._finish_error(task, "Task was cancelled", "", "cancelled", "queue")
            return
        self._tell_runner_cancel(task, "Task was cancelled by the API caller")
        self._finish_error(task, "Task was cancelled", "", "cancelled", "run")

    def running_count(self) -> int:
        return sum(
            1 for t in self._tasks.values() if t.status in (TaskStatus.OFFERED, TaskStatus.RUNNING)
        )

    def connection(self, runner_id: str) -> RunnerConnection | None:
        runner = self._runners.get(runner_id)
        return runner.connection if runner else None

    def runner_ids(self) -> list[str]:
        return [rid for rid, runner in self._runners.items() if runner.registered]

    def state(self) -> dict[str, int]:
        """Counts for the metrics gauges: runners, live offers, queued and running tasks."""
        now = self._clock()
        registered = [runner for runner in self._runners.values() if runner.registered]
        return {
            "runners": len(registered),
            "open_offers": sum(
                1
                for runner in registered
                for until in runner.offers.values()
                if until < 0 or until > now
            ),
            "queued_tasks": sum(len(queue) for queue in self._queues.values()),
            "running_tasks": self.running_count(),
        }

    # -- dispatch -----------------------------------------------------------------------

    def dispatch(self) -> None:
        """Match queued tasks to live offers, fairly across tenants."""
        if self._draining:
            return
        while True:
            offer = self._best_offer()
            if offer is None:
                return
            tenant = self._next_tenant()
            if tenant is None:
                return
            runner_id, offer_id = offer
            del self._runners[runner_id].offers[offer_id]
            task = self._tasks[self._queues[tenant].popleft()]
            task.status = TaskStatus.OFFERED
            task.runner_id, task.offer_id = runner_id, offer_id
            self._active[tenant] = self._active.get(tenant, 0) + 1
            self._arm(task, self.config.accept_timeout_s, self._accept_timed_out, task.task_id)
            self._runners[runner_id].connection.send(
                TaskOfferAccept(task_id=task.task_id, offer_id=offer_id)
            )

    def _next_tenant(self) -> str | None:
        for _ in range(len(self._round_robin)):
            tenant = self._round_robin[0]
            self._round_robin.rotate(-1)
            if self._queues.get(tenant) and self._active.get(tenant, 0) < self._quota(tenant):
                return tenant
        return None

    def _quota(self, tenant: str) -> int:
        return self.config.tenant_quotas.get(tenant, self.config.tenant_quota)

    def _best_offer(self) -> tuple[str, str] | None:
        """The newest live offer of any registered runner (n8n's broker takes the first)."""
        now = self._clock()
        best: tuple[float, str, str] | None = None
        for runner_id, runner in self._runners.items():
            if not runner.registered:
                continue
            for offer_id, until in list(runner.offers.items()):
                if 0 <= until <= now:
                    del runner.offers[offer_id]
                    continue
                rank = float("inf") if until < 0 else until
                if best is None or rank > best[0]:
                    best = (rank, runner_id, offer_id)
        return None if best is None else (best[1], best[2])

    def _queue(self, task: BrokerTask, *, front: bool) -> None:
        tenant = task.tenant
        queue = self._queues.setdefault(tenant, deque())
        if tenant not in self._round_robin:
            self._round_robin.append(tenant)
        if front:
            queue.appendleft(task.task_id)
        else:
            queue.append(task.task_id)

    def _unqueue(self, task: BrokerTask) -> None:
        queue = self._queues.get(task.tenant)
        if queue and task.task_id in queue:
            queue.remove(task.task_id)

    def _release(self, task: BrokerTask) -> None:
        tenant = task.tenant
        if task.status in (TaskStatus.OFFERED, TaskStatus.RUNNING):
            self._active[tenant] = max(0, self._active.get(tenant, 0) - 1)

    def _requeue(self, task: BrokerTask, cause: str) -> None:
        self._metrics.requeues.labels(cause=cause).inc()
        self._release(task)
        task.status, task.runner_id, task.offer_id = TaskStatus.QUEUED, None, None
        self._queue(task, front=True)
        self._arm(task, self.config.queue_timeout_s, self._queue_expired, task.task_id)

    # -- protocol steps -----------------------------------------------------------------

    def _accepted(self, runner_id: str, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.OFFERED or task.runner_id != runner_id:
            if (
                task is not None
                and task.status is TaskStatus.RUNNING
                and task.runner_id == runner_id
            ):
                log.info("repeated acceptance of %s by %s ignored", task_id, runner_id)
                return
            # Cancelled while offered, requeued by the accept timer, or unknown: the runner
            # holds a slot waiting for settings that will never come. Free it.
            log.info(
                "late or unknown acceptance of %s by %s: telling it to drop the task",
                task_id,
                runner_id,
                extra={"taskId": task_id},
            )
            self._runners[runner_id].connection.send(
                TaskCancel(task_id=task_id, reason=NOT_WANTED_REASON)
            )
            return
        task.status = TaskStatus.RUNNING
        task.started_at = self._clock()
        self._metrics.queue_wait.observe(task.started_at - task.submitted_at)
        timeout_s = task.limits.timeout_s or self.config.default_timeout_s
        self._arm(task, timeout_s + self.config.timeout_grace_s, self._task_timed_out, task_id)
        connection = self._runners[runner_id].connection
        try:
            if task.settings is None:
                raise RuntimeError("the task's settings are gone")
            connection.send_frame(settings_frame(task_id, task.settings))
        except Exception as exc:
            # The settings were encoded at submission, so this is a bug, not the
            # tenant's data; whatever it is, the runner now holds a slot waiting for
            # settings that will not come (n8n's runner waits forever, ours until the
            # broker's task timer). Free the slot and end the task now, with the cause.
            log.exception(
                "task %s: sending its settings failed", task_id, extra={"taskId": task_id}
            )
            connection.send(TaskCancel(task_id=task_id, reason=NOT_SENT_REASON))
            self._finish_error(
                task,
                "The broker could not send the task's settings to the runner",
                f"{type(exc).__name__}: {exc}"[:500],
                "dispatch_failed",
                "dispatch",
            )
            self.dispatch()
            return
        # Sent: the runner has them now; the broker keeps only what it still needs.
        self._queued_bytes[task.tenant] -= len(task.settings)
        task.settings = None

    def _declined(self, runner_id: str, task_id: str, reason: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.OFFERED or task.runner_id != runner_id:
            return
        log.info(
            "runner %s declined task %s: %s", runner_id, task_id, reason, extra={"taskId": task_id}
        )
        self._requeue(task, "declined")
        self.dispatch()

    def _completed(self, runner_id: str, message: TaskDone | TaskErrorMessage) -> None:
        task = self._tasks.get(message.task_id)
        if task is None or task.status.is_finished:
            log.info(
                "completion of unknown or finished task %s dropped",
                message.task_id,
                extra={"taskId": message.task_id},
            )
            return
        if task.runner_id != runner_id:
            log.warning(
                "task %s reported by %s, but runs on %s", task.task_id, runner_id, task.runner_id
            )
            return
        report = message.sandbox or {}
        audit = report.get("audit")
        self._keep_prints(task, report.get("prints"))
        if isinstance(message, TaskDone):
            result = message.data.result
            schema = None if task.output_schema is None else json.loads(task.output_schema)
            schema_error = validate_result(schema, result)
            if schema_error is not None:
                self._finish_error(
                    task,
                    "Result does not match outputSchema",
                    schema_error,
                    "output_schema_violation",
                    "result",
                    audit,
                )
            else:
                self._finish(task, {"status": "success", "result": result}, audit)
        else:
            error = message.error
            self._finish_error(
                task,
                error.message,
                error.description or "",
                str(report.get("code") or "task_error"),
                str(report.get("stage") or "run"),
                audit,
            )
        self.dispatch()

    def _keep_prints(self, task: BrokerTask, entries: Any) -> None:
        """Keep a runner's print entries up to the broker's caps; count what is dropped.

        ``entries``: print calls, each a list of strings (rpc params, or the report's
        ``prints`` under the sandbox-prints extension). Anything else is dropped whole.
        """
        if entries is None:
            return
        if not isinstance(entries, list | tuple):
            self._metrics.prints_dropped.inc()
            return
        dropped = 0
        for entry in entries:
            if (
                len(task.prints) >= self.config.max_print_calls
                or not isinstance(entry, list | tuple)
                or not all(isinstance(arg, str) for arg in entry)
            ):
                dropped += 1
                continue
            size = sum(len(arg) for arg in entry)
            if task.print_bytes + size > self.config.max_print_chars:
                dropped += 1
                continue
            task.print_bytes += size
            task.prints.append(list(entry))
        if dropped:
            self._metrics.prints_dropped.inc(dropped)
            log.warning(
                "task %s: %d print entries beyond the broker's cap dropped",
                task.task_id,
                dropped,
                extra={"taskId": task.task_id},
            )

    def _finish_error(
        self,
        task: BrokerTask,
        message: str,
        description: str,
        code: str,
        stage: str,
        audit: Any = None,
    ) -> None:
        error = {"message": message, "description": description, "code": code, "stage": stage}
        self._finish(task, {"status": "error", "error": error}, audit)

    def _finish(self, task: BrokerTask, body: dict[str, Any], audit: Any) -> None:
        if task.status.is_finished:
            return
        self._release(task)
        tenant = task.tenant
        self._unfinished[tenant] = max(0, self._unfinished.get(tenant, 0) - 1)
        self._queued_bytes[tenant] = max(0, self._queued_bytes.get(tenant, 0) - task.held_bytes)
        task.settings = task.output_schema = None
        try:
            document = to_json({**body, "prints": task.prints, "audit": audit})
        except (ValueError, TypeError, RecursionError) as exc:
            # Only a runner that breaks the protocol gets here (ours never sends NaN):
            # the caller gets an error it can parse, not invalid JSON.
            log.warning("task %s: the runner's report is not JSON: %s", task.task_id, exc)
            body = {
                "status": "error",
                "error": {
                    "message": "The runner's report cannot be encoded as JSON",
                    "description": f"{type(exc).__name__}: {exc}"[:500],
                    "code": "invalid_report",
                    "stage": "result",
                },
            }
            document = to_json({**body, "prints": [], "audit": None})
        task.prints = []  # now in the document
        task.status = TaskStatus.SUCCESS if body["status"] == "success" else TaskStatus.ERROR
        task.finished_at = self._clock()
        code = body["error"]["code"] if "error" in body else ""
        self._metrics.tasks.labels(status=task.status.value, error_code=code).inc()
        if task.started_at is not None:
            self._metrics.duration.observe(task.finished_at - task.started_at)
        task.document_json = document
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        task.done.set()
        self._retain(task)

    def _tell_runner_cancel(self, task: BrokerTask, reason: str) -> None:
        runner = self._runners.get(task.runner_id or "")
        if runner is not None and task.status is TaskStatus.RUNNING:
            runner.connection.send(TaskCancel(task_id=task.task_id, reason=reason))

    # -- timers -------------------------------------------------------------------------

    def _arm(
        self, task: BrokerTask, delay_s: float, callback: Callable[[str], None], task_id: str
    ) -> None:
        if task.timer is not None:
            task.timer.cancel()
        task.timer = asyncio.get_running_loop().call_later(delay_s, callback, task_id)

    def _accept_timed_out(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is not None and task.status is TaskStatus.OFFERED:
            log.info(
                "task %s: no answer to the offer acceptance within 2 s",
                task_id,
                extra={"taskId": task_id},
            )
            self._requeue(task, "accept_timeout")
            self.dispatch()

    def _task_timed_out(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.RUNNING:
            return
        # As n8n's broker: forget the task first, then tell the runner.
        self._finish_error(
            task, TIMED_OUT_REASON, "The broker's task timer fired.", "timeout", "run"
        )
        runner = self._runners.get(task.runner_id or "")
        if runner is not None:
            runner.connection.send(TaskCancel(task_id=task_id, reason=TIMED_OUT_REASON))
        self.dispatch()

    def _queue_expired(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.QUEUED:
            return
        waiting = self.waiting(task)
        assert waiting is not None  # a queued task always has a reason
        self._unqueue(task)
        self._finish_error(
            task,
            f"No runner took the task in time: {self._expiry_cause(task, waiting)}",
            f"It waited {self.config.queue_timeout_s:g} s in the queue "
            f"(SANDBOX_QUEUE_TIMEOUT_S). {waiting.message}",
            "queue_timeout",
            "queue",
        )

    def _expiry_cause(self, task: BrokerTask, waiting: Waiting) -> str:
        """Why a task waited out its queue timeout, in a few words for the error message."""
        match waiting.reason:
            case WaitReason.NO_RUNNER:
                since = self._no_runner_since
                assert since is not None
                if since <= task.submitted_at:
                    return "no runner was connected to this broker while it waited"
                gone_s = self._clock() - since
                return (
                    f"no runner is connected to this broker (the last one left {gone_s:.0f} s ago)"
                )
            case WaitReason.TENANT_QUOTA:
                quota = self._quota(task.tenant)
                return f"its tenant had its quota of {quota} tasks running"
            case WaitReason.DRAINING:
                return "the broker is shutting down"
            case _:
                return "every connected runner was busy"

    def _runner_lost(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.RUNNING:
            return
        if task.runner_id in self._runners:  # it came back: wait for its report
            timeout_s = task.limits.timeout_s or self.config.default_timeout_s
            self._arm(task, timeout_s + self.config.timeout_grace_s, self._task_timed_out, task_id)
            return
        self._finish_error(
            task, "The runner disconnected while running the task", "", "runner_lost", "run"
        )
        self.dispatch()

    def _retain(self, task: BrokerTask) -> None:
        """Keep the tenant's last finished tasks; forget the oldest ones first.

        At most ``max_tasks_kept`` of them and ``max_retained_bytes_per_tenant`` bytes of
        their documents; the newest is always kept, whatever its size (a document is
        bounded by what a runner may send), so its caller can read it once. Per tenant:
        one tenant's volume never evicts another's results.
        """
        tenant = task.tenant
        kept = self._finished.setdefault(tenant, deque())
        kept.append(task.task_id)
        retained = self._retained_bytes.get(tenant, 0) + len(task.document_json or "")
        while len(kept) > self.config.max_tasks_kept or (
            retained > self.config.max_retained_bytes_per_tenant and len(kept) > 1
        ):
            evicted = self._tasks.pop(kept.popleft(), None)
            if evicted is not None:
                retained -= len(evicted.document_json or "")
        self._retained_bytes[tenant] = retained

    # -- shutdown -----------------------------------------------------------------------

    def drain(self) -> None:
        """Stop dispatching and tell every runner to stop offering."""
        self._draining = True
        self.closing.set()
        for runner in self._runners.values():
            runner.offers.clear()
            if runner.registered:
                runner.connection.send(Drain())

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until every dispatched task has finished."""
        waits = [
            asyncio.ensure_future(task.done.wait())
            for task in self._tasks.values()
            if task.status in (TaskStatus.OFFERED, TaskStatus.RUNNING)
        ]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for waiter in pending:
                waiter.cancel()
        return self.running_count() == 0

    def close_all(self, code: int = 1001, reason: str = "broker shutting down") -> None:
        for runner in list(self._runners.values()):
            runner.connection.close(code, reason)
