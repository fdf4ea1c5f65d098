"""The broker's tasks written through to its store: memory to serve from, a record to
restart from.

Owns: every change of a task that the store must see (a new task, a lease, a
requeue, a result, retention's evictions), in the order the core makes them; taking
over what a store kept when a broker starts (:meth:`TaskLedger.recover`); which
attempt a runner's task id names (:meth:`TaskLedger.current`; a result of an older
one is dropped and counted, :meth:`TaskLedger.is_stale`); and the tasks'
``Idempotency-Key`` replays (:meth:`TaskLedger.replay`).

The core (:mod:`runner.broker_server.core`) decides when a task moves; this module
only records it. The broker's memory (:class:`~runner.broker_server.tasks.TaskTable`)
is what a running broker serves from; the store is what the next broker process
starts from. So a new task is refused when the store cannot keep it (the caller
must not be told it was accepted), while a later step that fails to be written is
logged and counted and the broker goes on: a restart may then find that task one
step behind (queued again, or run again at its next attempt), never lost by this
broker.

No I/O of its own: the store is called synchronously (see
:mod:`runner.broker_server.store` for why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from runner.broker_server.store import SharedStore, StoredTask, TaskStore, record_of, task_of
from runner.broker_server.tasks import BrokerTask, TaskTable, parse_wire_id
from runner.errors import IdempotencyKeyReused, InfrastructureError
from runner.metrics import BrokerMetrics

log = logging.getLogger(__name__)


class TaskLedger:
    """``table`` (the broker's tasks in memory) and ``store``, kept in step.

    ``max_kept``, ``max_bytes``: each tenant's retention of finished tasks (count, and
    bytes of their result documents), applied in memory and in the store alike.
    """

    def __init__(
        self,
        store: TaskStore,
        metrics: BrokerMetrics,
        *,
        max_kept: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        # A store other brokers share: the table holds only what this broker claimed
        # (its working set); every other task is read from the store (:meth:`view`).
        self.shared: SharedStore | None = cast(SharedStore, store) if store.is_shared else None
        self.table = TaskTable()
        # A shared store's results it failed to take (Redis unreachable), by task id.
        self.unwritten: dict[str, BrokerTask] = {}
        self._metrics = metrics
        self._max_kept = max_kept
        self._max_bytes = max_bytes
        self._clock = clock

    def recover(self, now: float, wall_now: datetime) -> list[BrokerTask]:
        """Take over what the store kept: results (within retention) into the table,
        and the queued tasks, returned in submission order for the core to queue. The
        store has put each task whose lease died with the last broker back in the
        queue at its next attempt (counted as requeues, cause ``broker_restart``)."""
        recovered = self.store.recover()
        for stored in recovered.finished:
            task = task_of(stored, now, wall_now)
            self.table.add(task)
            self._retain(task)
        queued = [task_of(stored, now, wall_now) for stored in recovered.unfinished]
        for task in queued:
            self.table.add(task)
        if recovered.requeued:
            self._metrics.requeues.labels(cause="broker_restart").inc(recovered.requeued)
        if self.store.is_durable:
            log.info(
                "task store %s: %d queued task(s) (%d of them back from a runner, at their "
                "next attempt) and %d result(s) taken over",
                self.store.location,
                len(queued),
                recovered.requeued,
                len(recovered.finished),
            )
        return queued

    def replay(self, tenant: str, key: str, fingerprint: str) -> BrokerTask | None:
        """The task ``tenant`` submitted with Idempotency-Key ``key`` (while it is kept),
        or None. Raises :class:`IdempotencyKeyReused` if that request was another."""
        if self.shared is not None:
            stored = self.shared.by_key(tenant, key)
            task = None if stored is None else self.view(stored)
        else:
            task = self.table.by_key(tenant, key)
        if task is not None and task.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r} was used for task {task.task_id} with a different "
                "request; a retry must send the same request (or use a new key)"
            )
        return task

    def current(self, wire: str) -> BrokerTask | None:
        """The task whose current attempt a runner's task id names (None: unknown, or
        an older attempt's)."""
        task_id, attempt = parse_wire_id(wire)
        task = self.table.get(task_id)
        return task if task is not None and task.attempt == attempt else None

    def is_stale(self, wire: str, runner_id: str) -> bool:
        """Whether a result a runner sent names an older attempt of a known task (its
        lease died with a broker; the task went back to the queue since): such a result
        is dropped, logged and counted."""
        task_id, attempt = parse_wire_id(wire)
        task = self.table.get(task_id)
        if task is None or task.attempt == attempt:
            return False
        self.drop_stale(task_id, attempt, task.attempt, runner_id)
        return True

    def drop_stale(self, task_id: str, attempt: int, current: int, runner_id: str) -> None:
        """A result of ``attempt`` while the task is at ``current``: logged and counted."""
        log.warning(
            "result of attempt %d of task %s from %s dropped: the task is at attempt %d",
            attempt,
            task_id,
            runner_id,
            current,
            extra={"taskId": task_id},
        )
        self._metrics.stale_results.inc()

    def add(self, task: BrokerTask) -> None:
        """A new task, in the store first. Raises :class:`InfrastructureError` when the
        store cannot keep it (then the broker does not know it either). (A shared
        store's new task goes through :meth:`SharedStore.submit`, from the core.)"""
        self.store.add(record_of(task))
        self.table.add(task)

    def view(self, stored: StoredTask) -> BrokerTask:
        """A task this broker does not hold, as read from a shared store: a snapshot."""
        return task_of(stored, self._clock(), datetime.now(UTC), keep_runner=True)

    def leased(self, task: BrokerTask, *, running: bool) -> bool:
        """``task`` was offered to its runner (``running``: accepted, settings next).
        False: a shared store has it no longer as this broker's (let it go).

        A shared store records the running lease only: an offer changes nothing a
        reclaim needs (no settings have left: a task its dead broker had only offered
        goes back at the same attempt), and a step less per task counts there."""
        assert task.runner_id is not None
        if self.shared is not None and not running:
            return True
        return (
            self._write(
                "lease",
                self.store.lease,
                task.task_id,
                task.attempt,
                task.runner_id,
                running=running,
            )
            is not False
        )

    def requeued(self, task: BrokerTask) -> bool:
        """Queued again (a shared store's queue: for any broker). False as :meth:`leased`."""
        return self._write("requeue", self.store.requeue, task.task_id, task.attempt) is not False

    def retrying(self, task: BrokerTask, failed_attempt: int) -> bool:
        """``failed_attempt`` failed and its policy tries again: ``task`` (already at its
        next attempt, with that attempt's error kept) is queued again. False as
        :meth:`leased`."""
        attempts = tuple(task.attempts)
        written = self._write("retry", self.store.retry, task.task_id, failed_attempt, attempts)
        return written is not False

    def finished(self, task: BrokerTask) -> bool:
        """``task`` has its result document: kept, and its tenant's oldest forgotten.
        False: a shared store holds another attempt of it, or its result already (this
        broker's lease lapsed and another broker took the task): this result is
        dropped, counted as stale, and the task is read from the store from now on."""
        assert task.document_json is not None
        written = self._write(
            "result",
            self.store.finish,
            task.task_id,
            task.attempt,
            task.status.value,
            task.document_json,
            tuple(task.attempts),
        )
        if written is False:
            log.warning(
                "result of attempt %d of task %s dropped: the store holds another attempt "
                "of it, or its result",
                task.attempt,
                task.task_id,
                extra={"taskId": task.task_id},
            )
            self._metrics.stale_results.inc()
        if self.shared is not None:
            if written is None:
                # The store failed: kept here (read from here) and written again by
                # the cluster link (:meth:`write_unwritten`) until the store takes it.
                self.unwritten[task.task_id] = task
                return True
            self.table.remove(task.task_id)  # read from the store from now on (its retention)
        else:
            self._retain(task)
        return written is not False

    def write_unwritten(self) -> None:
        """Results a shared store failed to take, written again (in the order they came):
        each one taken, or refused as stale, is read from the store from now on."""
        for task_id, task in list(self.unwritten.items()):
            assert task.document_json is not None
            try:
                written = self.store.finish(
                    task_id,
                    task.attempt,
                    task.status.value,
                    task.document_json,
                    tuple(task.attempts),
                )
            except InfrastructureError:
                return  # still down: the next round
            del self.unwritten[task_id]
            if not written:
                self._metrics.stale_results.inc()
            self.table.remove(task_id)

    def close(self) -> None:
        self.store.close()

    def _retain(self, task: BrokerTask) -> None:
        forgotten = self.table.retain(task, self._max_kept, self._max_bytes)
        if forgotten:
            self._write("retention", self.store.forget, forgotten)

    def _write(self, step: str, write: Callable[..., object], *args: Any, **kw: Any) -> object:
        try:
            return write(*args, **kw)
        except InfrastructureError:
            log.exception("the task store failed to record a %s", step)
            self._metrics.store_errors.inc()
            return None
