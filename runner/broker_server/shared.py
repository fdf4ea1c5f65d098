"""The broker's rules for a task store other brokers share (Redis): mixed into the core.

Owns what :class:`runner.broker_server.core.Broker` does only over a
:class:`~runner.broker_server.store.SharedStore`: a submission that goes to the shared
queue (admitted against the tenant's counts there), the tasks this broker claims for
its runners' spare slots (:meth:`SharedRules.spare`, :meth:`SharedRules.at_quota`,
:meth:`SharedRules.adopt`), letting a task go (handed back, or fenced out: another
broker's since) and following a task it does not hold (:meth:`SharedRules.refresh`),
a result re-sent by a runner whose broker died (taken over while its attempt is
current), cancels of tasks held elsewhere, and results the store failed to take
(:meth:`SharedRules.write_unwritten`). The rules every broker has are in the core;
the event-loop side (claims, leases, the channels) is
:mod:`runner.broker_server.cluster`.

Sans-I/O, as the core: the store is called synchronously. A mixin: the attributes and
methods of the core it uses are declared below for the type checker only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from runner.broker_server.events import Event, TaskLetGo
from runner.broker_server.retry import backoff_left_s
from runner.broker_server.store import SharedStore, StoredTask, TenantFull, record_of
from runner.broker_server.submission import Prepared
from runner.broker_server.tasks import (
    BrokerTask,
    TaskStatus,
    TaskTimer,
    error_body,
    parse_wire_id,
    result_document,
)
from runner.broker_server.tenants import check_admission
from runner.sandbox.base import CANCELLED_MESSAGE, ErrorCode, Stage

if TYPE_CHECKING:
    from runner.broker_server.core import BrokerConfig
    from runner.broker_server.ledger import TaskLedger
    from runner.broker_server.runners import Runners
    from runner.broker_server.tasks import TaskTable
    from runner.broker_server.tenants import Tenants
    from runner.metrics import BrokerMetrics

log = logging.getLogger(__name__)


class SharedRules:
    """The core's rules for a shared store (each a no-op question when ``_shared`` is
    None, where it says so)."""

    if TYPE_CHECKING:  # the core's, used here
        config: BrokerConfig
        clock: Callable[[], float]
        _shared: SharedStore | None
        _ledger: TaskLedger
        _tasks: TaskTable
        _tenants: Tenants
        _runners: Runners
        _metrics: BrokerMetrics
        _draining: bool
        _on_change: Callable[[], None]

        def dispatch(self) -> None: ...
        def cancel(self, task: BrokerTask) -> None: ...
        def replay(self, tenant: str, key: str, fingerprint: str) -> BrokerTask | None: ...
        def _new_task(
            self, prepared: Prepared, idempotency: tuple[str, str] | None
        ) -> BrokerTask: ...
        def _quota(self, tenant: str) -> int: ...
        def _release(self, task: BrokerTask) -> None: ...
        def _arm(self, task: BrokerTask, delay_s: float, timer: TaskTimer) -> None: ...
        def _disarm(self, task: BrokerTask) -> None: ...
        def _emit(self, event: Event) -> None: ...

    def _submit_shared(self, prepared: Prepared, idempotency: tuple[str, str] | None) -> BrokerTask:
        """Into the shared store's queue, admitted against the tenant's counts there
        (across brokers); the task returned is a snapshot (this broker claims it, or
        another does, for a runner's slot). When this broker has a free slot for it and
        nothing waits in the shared queue, the store gives it to this broker at once
        (a claim saved) and it is dispatched here."""
        assert self._shared is not None
        config = self.config
        check_admission(
            prepared.tenant,
            prepared.size_bytes,
            unfinished=0,
            queued_bytes=0,
            max_unfinished=config.max_unfinished_per_tenant,
            max_bytes=config.max_queued_bytes_per_tenant,
        )  # (alone too large: a 413, before the store is asked)
        task = self._new_task(prepared, idempotency)
        claim = self.spare() > 0 and task.tenant not in self.at_quota()
        try:
            outcome, existing = self._shared.submit(record_of(task), claim=claim)
        except TenantFull as full:
            check_admission(
                prepared.tenant,
                prepared.size_bytes,
                unfinished=full.admission.unfinished,
                queued_bytes=full.admission.queued_bytes,
                max_unfinished=config.max_unfinished_per_tenant,
                max_bytes=config.max_queued_bytes_per_tenant,
            )
            raise AssertionError("the store refused an admissible task") from full
        if existing is not None and idempotency is not None:
            # Another broker took the same key first, in the same instant.
            replayed = self.replay(prepared.tenant, *idempotency)
            if replayed is not None:
                return replayed
        self._metrics.submitted.inc()
        if outcome == "claimed":
            self._hold(task)
            self.dispatch()
        else:
            self._on_change()  # (a chance to claim it at once)
        return task

    def adopt(self, claimed: list[StoredTask]) -> None:
        """Tasks this broker claimed from the shared store's queue: queued here (a task
        in its retry's back-off waits out what is left of it first; one whose queue
        time is over expires at once), in the order they came."""
        wall_now = datetime.now(UTC)
        for stored in claimed:
            task = self._ledger.view(stored)
            if (backoff_s := backoff_left_s(task.retry, task.attempts, wall_now)) > 0:
                self._tasks.add(task)
                self._tenants.recount(task.tenant, task.held_bytes)
                self._arm(task, backoff_s, TaskTimer.RETRY)
                continue
            self._hold(task)
        self.dispatch()

    def _hold(self, task: BrokerTask) -> None:
        """A task this broker now holds, queued here (its queue time counted from its
        submission)."""
        self._tasks.add(task)
        self._tenants.recount(task.tenant, task.held_bytes)
        self._tenants.queue(task.tenant, task.task_id, front=False)
        waited = self.clock() - task.submitted_at
        self._arm(task, max(0.0, self.config.queue_timeout_s - waited), TaskTimer.QUEUE)

    def spare(self) -> int:
        """Runner slots on offer here that no task here could take: how many tasks to
        claim from a shared store's queue (a task of a tenant at its quota here takes
        no slot until one of its tenant's ends)."""
        if self._draining:
            return 0
        waiting = self._tenants.queued_count(self._quota)
        return self._runners.open_offers(self.clock()) - waiting

    def at_quota(self) -> set[str]:
        """Tenants that have their quota of tasks on this broker's runners: a claim
        from a shared store's queue takes none of theirs."""
        return self._tenants.at_quota(self._quota)

    def _let_go(self, task: BrokerTask) -> None:
        """A shared store's task this broker no longer holds (handed back to the queue,
        or taken by another broker after this one's lease lapsed): forgotten here."""
        self._release(task)
        self._tenants.unqueue(task.tenant, task.task_id)
        self._tenants.finished(task.tenant, task.held_bytes)
        self._disarm(task)
        self._tasks.remove(task.task_id)
        self._emit(TaskLetGo(task.task_id))

    def _hand_back_queued(self) -> None:
        """A shared store's tasks queued here with no runner here to take them: back to
        the shared queue, for a broker that has one."""
        if self._shared is None:
            return
        for task in [t for t in self._tasks if t.status is TaskStatus.QUEUED]:
            if task.timer is TaskTimer.RETRY:
                continue  # in its back-off: handed back when it is due
            self._ledger.requeued(task)
            self._let_go(task)

    def refresh(self, task: BrokerTask) -> bool:
        """Bring a snapshot of a task another broker holds up to date (from the shared
        store). Has it finished?"""
        if self._shared is None or task.status.is_finished:
            return task.status.is_finished
        if (held := self._tasks.get(task.task_id)) is not None:
            return held.status.is_finished
        stored = self._shared.load(task.task_id)
        if stored is None:
            return False
        fresh = self._ledger.view(stored)
        task.status, task.runner_id, task.attempt = fresh.status, fresh.runner_id, fresh.attempt
        task.attempts, task.document_json = fresh.attempts, fresh.document_json
        return task.status.is_finished

    def write_unwritten(self) -> bool:
        """Write again the results a shared store failed to take. Any left?"""
        self._ledger.write_unwritten()
        return bool(self._ledger.unwritten)

    def held_ids(self) -> set[str]:
        """The ids of the tasks this broker holds (a shared store's orphans are the
        ones it has as this broker's beyond these)."""
        return {task.task_id for task in self._tasks if not task.status.is_finished} | set(
            self._ledger.unwritten
        )

    def is_held(self, task: BrokerTask) -> bool:
        """Whether ``task`` is this broker's own object (not a shared store's snapshot)."""
        return self._tasks.get(task.task_id) is task

    def _cancel_elsewhere(self, task: BrokerTask) -> None:
        """Cancel a shared store's task this broker does not hold: one in the shared
        queue ends here (the store's fence decides against a broker claiming it at the
        same moment); one another broker holds is cancelled by it (a message)."""
        assert self._shared is not None
        if self.refresh(task):
            return  # it has ended meanwhile
        if task.status is TaskStatus.QUEUED:
            body = error_body(CANCELLED_MESSAGE, "", ErrorCode.CANCELLED, Stage.QUEUE)
            document, _ = result_document(task, body, None)
            if self._shared.finish(task.task_id, task.attempt, "error", document, unowned=True):
                self._metrics.tasks.labels(status="error", error_code=ErrorCode.CANCELLED).inc()
                self.refresh(task)
                return
        self._shared.publish_cancel(task.task_id)

    def cancel_requested(self, task_id: str) -> None:
        """Another broker's API was asked to cancel ``task_id``: cancelled if held here."""
        task = self._tasks.get(task_id)
        if task is not None:
            self.cancel(task)

    def _take_over(self, runner_id: str, wire: str) -> BrokerTask | None:
        """A completion for a task this broker does not hold, from a runner whose broker
        died (it re-sends what was not acknowledged): the task is taken over if the
        shared store still has it at that attempt; an older attempt's is counted."""
        assert self._shared is not None
        task_id, attempt = parse_wire_id(wire)
        stored = self._shared.take_over(task_id, attempt, runner_id)
        if stored is None:
            current = self._shared.load(task_id)
            if current is not None and current.attempt > attempt:
                self._ledger.drop_stale(task_id, attempt, current.attempt, runner_id)
            return None
        task = self._ledger.view(stored)
        task.status, task.runner_id = TaskStatus.RUNNING, runner_id
        self._tasks.add(task)
        self._tenants.recount(task.tenant, task.held_bytes)
        self._tenants.activate(task.tenant)
        log.info("task %s: taken over from a broker that left, with its result", task_id)
        return task
