"""The broker's task store: what must outlive the broker process, behind one seam.

Owns: the seam (:class:`TaskStore`), the record it keeps of a task
(:class:`StoredTask`), what a broker finds when it starts on a store
(:class:`Recovered`), the settings' spelling of a store (:func:`parse_store`:
``memory``, ``sqlite``, ``sqlite:///PATH``) and the store that keeps nothing beyond
the process (:class:`MemoryStore`: a restart starts empty).

What survives is what a client or a runner was promised: a **queued task** with its
submission (the settings as JSON text, the ``outputSchema``), the **result document**
of a finished task (kept within the tenant's retention, as in memory), the
**idempotency key** a task was submitted with, the **lease** of a dispatched
task: which runner has it and under which **attempt**, and a task's **retry
policy** with the errors of its failed attempts (a retry is one step: the failed
attempt's error kept, the task queued again at the next attempt,
:meth:`TaskStore.retry`). Tenants' counters (unfinished
tasks, queued bytes, tasks on runners) are not stored: the broker recounts them from
the tasks it recovers, so they cannot drift from the tasks they count. Timers are not
stored either (the monotonic clock does not survive a restart): a recovered queued
task's queue timeout starts again.

**Leases and fencing.** A task is dispatched under an attempt number (1 for its
first). When a broker starts on a store, every lease of the broker that died with it
is over: :meth:`TaskStore.recover` puts each offered or running task back in the
queue with ``attempt + 1``, in one durable step, before anything is dispatched. The
runner that had the old attempt may still be running it; the broker tells the two
apart by the task id on the wire (``<id>`` for attempt 1, ``<id>.<attempt>`` after:
:func:`runner.broker_server.tasks.wire_id`), so a late result of an old attempt is
dropped and counted, never taken for the current one. :meth:`TaskStore.finish` is
itself conditional on the attempt (a compare-and-set), which is what a store shared
by several brokers needs: there the store, not one broker's memory, is the fence.

**Sans-I/O in spirit.** The core (:mod:`runner.broker_server.core`) calls the store
synchronously, inside its own methods: the stores here are a no-op and a local SQLite
file whose writes take microseconds (two fsyncs per task: see
:mod:`runner.broker_server.sqlite_store`). Going through the web layer instead would
let the core answer before its state is written, or make every rule ``async``; a
synchronous seam keeps each rule one plain method, tested with a fake clock and a
store in a temporary directory. The core holds its working set (queues, fair turns,
offers, timers) in memory and writes through to the store; the store is the record
the *next* broker process starts from. A store shared by several brokers
(:class:`SharedStore`: Redis) fits the same seam, with leases that expire and every
step fenced: its queue and fair turns are in the store, the core's table is the
working set of what it claimed (see :mod:`runner.broker_server.redis_store`).

No I/O here: the SQLite and Redis stores are modules of their own (each alone imports
its client library), chosen by :func:`runner.broker_server.server.open_store`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from runner.broker_server.retry import AttemptError, RetryPolicy
from runner.broker_server.submission import TaskLimits
from runner.broker_server.tasks import BrokerTask, TaskStatus
from runner.sandbox.base import Mode

MEMORY = "memory"
SQLITE = "sqlite"
SQLITE_PREFIX = "sqlite:///"
REDIS = "redis"
SQLITE_FILE_NAME = "broker-tasks.sqlite3"  # in the broker's state directory by default


@dataclass(frozen=True, slots=True)
class StoredTask:
    """One task as the store keeps it.

    ``status``: ``queued``, ``offered``, ``running`` (its lease: ``runner_id`` and
    ``attempt``), ``success``, ``error`` or ``dead`` (its ``document_json``).
    ``settings`` and ``output_schema``: JSON text, kept until the task finishes (a
    recovered task is dispatched again from them). ``retry``: its policy (None: one
    attempt); ``attempts``: the errors of its failed attempts, oldest first.
    """

    task_id: str
    tenant: str
    mode: Mode
    limits: TaskLimits
    submitted_wall: datetime
    status: str = "queued"
    attempt: int = 1
    runner_id: str | None = None
    settings: str | None = None
    output_schema: str | None = None
    document_json: str | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None  # of the request that created it, for that key
    retry: RetryPolicy | None = None
    attempts: tuple[AttemptError, ...] = ()


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a broker finds on its store when it starts.

    ``unfinished``: queued tasks in submission order, each offered or running one
    already back in the queue at its next attempt (``requeued`` of them);
    ``finished``: tasks with their result documents, oldest finished first.
    """

    unfinished: list[StoredTask] = field(default_factory=list)
    finished: list[StoredTask] = field(default_factory=list)
    requeued: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    """A tenant's counts in a shared store when it refused the tenant's new task."""

    unfinished: int
    queued_bytes: int


class TenantFull(Exception):
    """A shared store refused a new task: its tenant is at a limit there (the core
    names which, :func:`runner.broker_server.tenants.check_admission`)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission)
        self.admission = admission


class TaskStore(Protocol):
    """Where the broker keeps what must outlive its process. Called synchronously by
    the core; each method is one atomic step. A fault is raised as
    :class:`runner.errors.InfrastructureError` (translated at the store's edge)."""

    @property
    def location(self) -> str:
        """Where the store is, for logs and errors (``memory``, a file's path)."""
        ...

    @property
    def is_durable(self) -> bool:
        """Whether what is stored outlives this process."""
        ...

    def recover(self) -> Recovered:
        """What survived, every lease of the previous broker ended (its task queued
        again at the next attempt), in one durable step. Called once, at start."""
        ...

    @property
    def is_shared(self) -> bool:
        """Whether other brokers use the store too (a :class:`SharedStore`)."""
        ...

    def add(self, task: StoredTask) -> None:
        """A new queued task (durable before the caller is told it was accepted)."""
        ...

    def lease(self, task_id: str, attempt: int, runner_id: str, *, running: bool) -> bool:
        """The task was offered to ``runner_id`` (``running``: it accepted, and its
        settings go out next: durable before they do). False: a shared store no longer
        has it as this broker's at that attempt (the broker must let it go)."""
        ...

    def requeue(self, task_id: str, attempt: int) -> bool:
        """The task is back in the queue (its runner declined, did not answer, left); a
        shared store's queue, for any broker. False as for :meth:`lease`."""
        ...

    def retry(self, task_id: str, attempt: int, attempts: tuple[AttemptError, ...]) -> bool:
        """``attempt`` failed and the task's retry policy tries again: the task is back in
        the queue at ``attempt + 1`` with ``attempts`` (its failed attempts' errors).
        Conditional on ``attempt``, as :meth:`finish`; False as for :meth:`lease`."""
        ...

    def finish(
        self,
        task_id: str,
        attempt: int,
        status: str,
        document_json: str,
        attempts: tuple[AttemptError, ...] = (),
    ) -> bool:
        """The task's result, for ``attempt`` (with its failed attempts' errors, if it
        has a retry policy); False when the store holds another attempt (or none
        unfinished): the result is stale and was not written."""
        ...

    def forget(self, task_ids: Iterable[str]) -> None:
        """Finished tasks evicted by retention: their documents and keys go."""
        ...

    def close(self) -> None: ...


class SharedStore(TaskStore, Protocol):
    """A store several brokers share (:mod:`runner.broker_server.redis_store`): the
    queue is in the store, each broker claims from it for its runners' slots and
    holds what it claimed under a lease it renews; what it reads of a task it does
    not hold, it reads from the store."""

    @property
    def broker_id(self) -> str: ...

    @property
    def lease_s(self) -> float: ...

    def renew(self) -> None:
        """This broker is alive for another ``lease_s``."""
        ...

    def set_limits(
        self, *, max_unfinished: int, max_bytes: int, max_kept: int, max_retained_bytes: int
    ) -> None:
        """Each tenant's admission and retention limits (the core's configuration)."""
        ...

    def reclaim(self) -> tuple[int, int, int]:
        """Dead brokers' tasks back in the queue: (brokers, queued, running)."""
        ...

    def claim(self, count: int, skip: Iterable[str] = ()) -> list[StoredTask]:
        """Up to ``count`` queued tasks, now this broker's (none of ``skip``'s tenants)."""
        ...

    def submit(self, task: StoredTask, *, claim: bool) -> tuple[str, str | None]:
        """A new task: ``("queued", None)``, ``("claimed", None)`` (``claim``: held by
        this broker at once, when nothing waits in the queue) or ``("replay", id)``."""
        ...

    def give_back_orphans(self, held: set[str]) -> int:
        """Tasks the store has as this broker's but ``held`` lacks, back in the queue."""
        ...

    def take_over(self, task_id: str, attempt: int, runner_id: str) -> StoredTask | None:
        """A task whose ``attempt`` a runner reports here, now this broker's, if it is
        still at that attempt and unfinished."""
        ...

    def load(self, task_id: str) -> StoredTask | None: ...

    def by_key(self, tenant: str, key: str) -> StoredTask | None: ...

    def recent(self, tenant: str, limit: int, status: str | None = None) -> list[StoredTask]: ...

    def finish(
        self,
        task_id: str,
        attempt: int,
        status: str,
        document_json: str,
        attempts: tuple[AttemptError, ...] = (),
        *,
        unowned: bool = False,
    ) -> bool:
        """As :meth:`TaskStore.finish`; ``unowned``: only if no broker holds the task."""
        ...

    def publish_cancel(self, task_id: str) -> None:
        """Ask whichever broker holds ``task_id`` to cancel it."""
        ...

    def listen(self) -> AsyncIterator[tuple[str, str]]:
        """The brokers' channels: (``ready`` | ``done`` | ``cancel``, message)."""
        ...


class MemoryStore:
    """Keeps nothing beyond the process: the broker's memory is all there is (a
    restart starts empty). For tests and throwaway runs (``SANDBOX_BROKER_STORE=memory``;
    the default is the SQLite store)."""

    location = MEMORY
    is_durable = False
    is_shared = False

    def recover(self) -> Recovered:
        return Recovered()

    def add(self, task: StoredTask) -> None:
        pass

    def lease(self, task_id: str, attempt: int, runner_id: str, *, running: bool) -> bool:
        return True

    def requeue(self, task_id: str, attempt: int) -> bool:
        return True

    def retry(self, task_id: str, attempt: int, attempts: tuple[AttemptError, ...]) -> bool:
        return True

    def finish(
        self,
        task_id: str,
        attempt: int,
        status: str,
        document_json: str,
        attempts: tuple[AttemptError, ...] = (),
    ) -> bool:
        return True  # the core's own check (the attempt on the wire) is the fence

    def forget(self, task_ids: Iterable[str]) -> None:
        pass

    def close(self) -> None:
        pass


def record_of(task: BrokerTask) -> StoredTask:
    """A new task as the store keeps it (at submission: queued, attempt 1)."""
    return StoredTask(
        task_id=task.task_id,
        tenant=task.tenant,
        mode=task.mode,
        limits=task.limits,
        submitted_wall=task.submitted_wall,
        status=task.status.value,
        attempt=task.attempt,
        runner_id=task.runner_id,
        settings=task.settings,
        output_schema=task.output_schema,
        document_json=task.document_json,
        idempotency_key=task.idempotency_key,
        fingerprint=task.fingerprint,
        retry=task.retry,
        attempts=tuple(task.attempts),
    )


def task_of(
    stored: StoredTask, now: float, wall_now: datetime, *, keep_runner: bool = False
) -> BrokerTask:
    """A recovered task as the core holds it. ``now``: the core's clock; the task is
    placed as far in its past as it was submitted before ``wall_now`` (the order of
    recent tasks and the queue wait hold across the restart). ``keep_runner``: the
    runner of an unfinished task too (a view of another broker's task)."""
    age_s = max(0.0, (wall_now - stored.submitted_wall).total_seconds())
    status = TaskStatus(stored.status)
    return BrokerTask(
        task_id=stored.task_id,
        tenant=stored.tenant,
        mode=stored.mode,
        limits=stored.limits,
        submitted_at=now - age_s,
        submitted_wall=stored.submitted_wall,
        status=status,
        runner_id=stored.runner_id if status.is_finished or keep_runner else None,
        finished_at=now if status.is_finished else None,
        settings=stored.settings,
        output_schema=stored.output_schema,
        document_json=stored.document_json,
        attempt=stored.attempt,
        idempotency_key=stored.idempotency_key,
        fingerprint=stored.fingerprint,
        retry=stored.retry,
        attempts=list(stored.attempts),
    )


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A parsed ``SANDBOX_BROKER_STORE``: ``kind`` ``memory``, ``sqlite`` or ``redis``;
    ``path`` the SQLite file (None: :data:`SQLITE_FILE_NAME` in the broker's state
    directory); ``url`` Redis's."""

    kind: str
    path: Path | None = None
    url: str | None = None


def parse_store(value: str) -> StoreSpec:
    """``memory``, ``sqlite`` (the file in the state directory), ``sqlite:///PATH``
    (relative to the working directory) or ``sqlite:////abs/PATH``, as SQLAlchemy
    spells them, or ``redis://[:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` with TLS).
    Raises ``ValueError`` with what is accepted."""
    text = value.strip()
    if text == MEMORY:
        return StoreSpec(MEMORY)
    if text == SQLITE:
        return StoreSpec(SQLITE)
    if text.startswith(SQLITE_PREFIX) and text != SQLITE_PREFIX:
        return StoreSpec(SQLITE, Path(text.removeprefix(SQLITE_PREFIX)))
    if text.startswith(("redis://", "rediss://")):
        host = text.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]
        if not host:
            raise ValueError(f"SANDBOX_BROKER_STORE names no Redis host: {value!r}")
        return StoreSpec(REDIS, url=text)
    raise ValueError(
        "SANDBOX_BROKER_STORE must be memory, sqlite, sqlite:///PATH or "
        f"redis://HOST:PORT/DB, not {value!r}"
    )
