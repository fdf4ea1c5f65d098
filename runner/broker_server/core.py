"""The broker's rules, with no I/O: tasks through their lives, dispatch, deadlines.

Owns: each task's life (queued -> offered -> running -> finished) and the protocol
steps that move it (n8n's broker side: ``runner:info``, offers, acceptance and
rejection, settings, prints, completions, ``broker:taskcancel``), dispatch (live
offers matched to queued tasks, fairly across tenants), every timer a task has (the
2 s accept timeout, the queue timeout, the broker-side task timeout, the grace a
runner that left gets to come back and a retry's back-off), trying a failed attempt
again when the task's retry policy says so (:mod:`runner.broker_server.retry`: which
failures, how often, after how long; a task it gives up on ends ``dead``), late
results from a runner that reconnected,
why a queued task waits, drain on shutdown, and taking over the queue a broker left
on a durable store. Its rules over a store other brokers share (Redis) are mixed in
from :mod:`runner.broker_server.shared`. What it keeps of runners, tenants,
submissions, tasks and callers' schemas is in the modules beside it; every change of
a task is written through to the store it is given (:mod:`runner.broker_server.ledger`).

Sans-I/O, as :mod:`runner.protocol.machine`: the web layer calls plain methods
(runner connections come in as objects with a non-blocking ``send``), time comes in
through an injected clock and :meth:`Broker.tick`, and what the web layer must act
on comes out: :meth:`Broker.next_deadline` (when to tick next) and
:meth:`Broker.events` (tasks that finished, the start of a drain, a result parked
until a worker checks it against its ``outputSchema``: the verdict comes back to
:meth:`Broker.result_checked`; :mod:`runner.broker_server.events`). The callback
given to :meth:`Broker.subscribe` says when either may have changed. The event loop,
its timer and whoever waits for a task live in :mod:`runner.broker_server.driver`.

Must not import asyncio, websockets, FastAPI or docker. Executes no code itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from runner.broker_server.deadlines import Deadlines
from runner.broker_server.events import CheckResult, Draining, Event, TaskFinished
from runner.broker_server.ledger import TaskLedger
from runner.broker_server.retry import AttemptError, backoff_left_s
from runner.broker_server.runners import RunnerConnection, Runners
from runner.broker_server.shared import SharedRules
from runner.broker_server.store import MemoryStore, TaskStore
from runner.broker_server.submission import Prepared, Submission, prepare, settings_frame
from runner.broker_server.tasks import (
    BrokerTask,
    TaskStatus,
    TaskTimer,
    Waiting,
    WaitReason,
    checked_body,
    completion_body,
    error_body,
    expiry_cause,
    keep_prints,
    new_task_id,
    result_document,
    waiting_for,
)
from runner.broker_server.tenants import Tenants
from runner.errors import InfrastructureError
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.messages import (
    EXTENSION_ACK,
    EXTENSION_PRINTS,
    EXTENSION_SANDBOX,
    LOG_NODE_OUTPUT,
    Drain,
    InfoRequest,
    Rpc,
    RunnerInfo,
    RunnerRegistered,
    TaskAccepted,
    TaskAck,
    TaskCancel,
    TaskDeferred,
    TaskDone,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
    TaskRejected,
)
from runner.sandbox.base import CANCELLED_MESSAGE, ErrorCode, Stage

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 2.0
TIMED_OUT_REASON = "Task execution timed out"
NOT_WANTED_REASON = "Task is no longer wanted"
NOT_SENT_REASON = "The broker could not send the task's settings"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    default_timeout_s: float = 60.0
    # Tenant -> its profile's timeout (the runner applies it; the broker times it).
    tenant_timeouts_s: dict[str, float] = field(default_factory=dict)
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
    # True (the server's): a result's outputSchema check that a tiny inline trial does
    # not settle is parked and reported (CheckResult), for a worker process; False: the
    # whole check is made inline (a core with nobody to make it elsewhere: tests).
    defer_result_checks: bool = False


class Broker(SharedRules):
    """All broker state and rules. Not thread-safe: the web layer calls it from its loop.

    ``clock``: monotonic seconds, for every deadline and duration (the web layer ticks
    with the same clock, :attr:`clock`). ``store``: what outlives the process (a
    :class:`MemoryStore` by default); what it holds is taken over at once.
    """

    def __init__(
        self,
        config: BrokerConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: BrokerMetrics | None = None,
        store: TaskStore | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # Without a registry of the caller's, a private one (nobody scrapes it).
        self._metrics = metrics or BrokerMetrics(CollectorRegistry())
        self._metrics.watch(self.state)
        self._runners = Runners(clock())
        self._ledger = TaskLedger(
            store or MemoryStore(),
            self._metrics,
            max_kept=config.max_tasks_kept,
            max_bytes=config.max_retained_bytes_per_tenant,
            clock=clock,
        )
        # A store other brokers share: tasks come from its queue (adopt), reads of tasks
        # this broker does not hold go to it; it applies this configuration's limits.
        self._shared = self._ledger.shared
        if self._shared is not None:
            self._shared.set_limits(
                max_unfinished=config.max_unfinished_per_tenant,
                max_bytes=config.max_queued_bytes_per_tenant,
                max_kept=config.max_tasks_kept,
                max_retained_bytes=config.max_retained_bytes_per_tenant,
            )
        self._tasks = self._ledger.table
        self._tenants = Tenants()
        self._deadlines = Deadlines()
        self._draining = False
        self._events: list[Event] = []
        self._on_change: Callable[[], None] = lambda: None
        # What the last broker on this store left: queued tasks with fresh queue timers,
        # tenants' counts recounted from them (results are in the table already).
        # A task in a retry's back-off waits out what is left of it first.
        wall_now = datetime.now(UTC)
        for task in self._ledger.recover(clock(), wall_now):
            self._tenants.recount(task.tenant, task.held_bytes)
            if (backoff_s := backoff_left_s(task.retry, task.attempts, wall_now)) > 0:
                self._arm(task, backoff_s, TaskTimer.RETRY)
                continue
            self._tenants.queue(task.tenant, task.task_id, front=False)
            self._arm(task, config.queue_timeout_s, TaskTimer.QUEUE)

    # -- what the web layer acts on --------------------------------------------------------

    def subscribe(self, on_change: Callable[[], None]) -> None:
        """Be called whenever :meth:`next_deadline` may have moved or :meth:`events` has
        something new. Called from inside the broker's methods: it must only schedule
        work (read the events, tick) for after the call, never call back in at once."""
        self._on_change = on_change

    def events(self) -> list[Event]:
        """What happened since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do next (the broker's clock), or None."""
        return self._deadlines.next()

    def tick(self, now: float) -> None:
        """Fire every task deadline due at ``now`` (the broker's clock), earliest first."""
        while (task_id := self._deadlines.pop_due(now)) is not None:
            task = self._tasks.get(task_id)
            if task is None or task.timer is None:
                continue
            timer, task.timer, task.deadline = task.timer, None, None
            try:
                self._fire(timer, task_id)
            except Exception:
                # One deadline's fault must not stop the others (each was its own timer).
                log.exception("task %s: its %s deadline failed", task_id, timer.value)

    @property
    def store(self) -> TaskStore:
        return self._ledger.store

    @property
    def is_draining(self) -> bool:
        return self._draining

    # -- runners ------------------------------------------------------------------------

    def runner_connected(self, connection: RunnerConnection) -> None:
        previous = self._runners.connect(connection, self.clock())
        if previous is not None:
            previous.connection.close(1000, "replaced by a new connection with the same id")
        connection.send(InfoRequest())

    def runner_disconnected(self, connection: RunnerConnection) -> None:
        if not self._runners.disconnect(connection, self.clock()):
            return
        for task in list(self._tasks):  # (a shared store's requeue forgets the task here)
            if task.runner_id != connection.runner_id or task.status.is_finished:
                continue
            if task.status is TaskStatus.OFFERED:
                self._requeue(task, "runner_disconnected")
            elif task.status is TaskStatus.RUNNING and task.parked is None:
                # The runner may come back (same id) and report it; otherwise it is lost.
                self._arm(task, self.config.runner_lost_grace_s, TaskTimer.RUNNER_LOST)
        if not self._runners.registered():
            self._hand_back_queued()
        self.dispatch()

    def runner_message(self, connection: RunnerConnection, message: BaseModel) -> None:
        runner = self._runners.of(connection)
        if runner is None:
            return
        if not runner.registered and not isinstance(message, RunnerInfo):
            return  # n8n's broker ignores everything before runner:info
        match message:
            case RunnerInfo():
                self._runners.register(runner, self.clock())
                connection.send(
                    RunnerRegistered(
                        extensions=(EXTENSION_SANDBOX, EXTENSION_PRINTS, EXTENSION_ACK)
                    )
                )
                if self._draining:
                    connection.send(Drain())
            case TaskOffer(offer_id=offer_id, valid_for=valid_for):
                self._metrics.offers.inc()
                if not self._draining:
                    runner.offer(offer_id, valid_for, self.clock())
                    self.dispatch()
            case TaskAccepted(task_id=task_id):
                self._accepted(connection.runner_id, task_id)
            case TaskRejected(task_id=task_id, reason=reason):
                self._declined(connection.runner_id, task_id, reason)
            case TaskDeferred(task_id=task_id):
                self._declined(connection.runner_id, task_id, "deferred by a launcher")
            case Rpc(task_id=task_id, name=name, params=params):
                task = self._ledger.current(task_id)
                if (
                    task is not None
                    and task.status is TaskStatus.RUNNING
                    and task.runner_id == connection.runner_id
                    and name == LOG_NODE_OUTPUT
                ):
                    self._keep_prints(task, [params])
            case TaskDone() | TaskErrorMessage():
                kept = self._completed(connection.runner_id, message)
                if kept and (message.sandbox or {}).get("ack") is True:
                    # After the task took it (its store's copy written through), or
                    # dropped it (a copy of one it has, a stale attempt's): either way
                    # the runner may forget it. A parked result is acked too. Not while a
                    # shared store is unreachable: the runner keeps it, and re-sends it.
                    connection.send(TaskAck(task_id=message.task_id))
            case _:
                log.info("ignoring %s from runner %s", type(message).__name__, connection.runner_id)

    def runner_ids(self) -> list[str]:
        return self._runners.ids()

    # -- tasks --------------------------------------------------------------------------

    def submit(
        self, submission: Submission | Prepared, *, idempotency: tuple[str, str] | None = None
    ) -> BrokerTask:
        """Queue a task, kept in the store before this returns. ``idempotency``: the
        request's ``Idempotency-Key`` and fingerprint (the task that key already names
        is returned instead, as :meth:`replay`).

        Raises :class:`SubmissionRefused` (a :class:`Submission` that cannot be encoded),
        :class:`TenantBacklogFull` (too many unfinished tasks, or too many bytes of
        them), :class:`TaskTooLarge` (more bytes than the tenant's budget, alone),
        :class:`IdempotencyKeyReused` or :class:`InfrastructureError` (the store failed:
        the task was not taken).
        """
        prepared = submission if isinstance(submission, Prepared) else prepare(submission)
        if idempotency is not None and (task := self.replay(prepared.tenant, *idempotency)):
            return task
        if self._shared is not None:
            return self._submit_shared(prepared, idempotency)
        self._tenants.admit(
            prepared.tenant,
            prepared.size_bytes,
            max_unfinished=self.config.max_unfinished_per_tenant,
            max_bytes=self.config.max_queued_bytes_per_tenant,
        )
        task = self._new_task(prepared, idempotency)
        try:
            self._ledger.add(task)
        except InfrastructureError:
            self._tenants.finished(task.tenant, task.held_bytes)
            raise
        self._metrics.submitted.inc()
        self._tenants.queue(task.tenant, task.task_id, front=False)
        self._arm(task, self.config.queue_timeout_s, TaskTimer.QUEUE)
        self.dispatch()
        return task

    def _new_task(self, prepared: Prepared, idempotency: tuple[str, str] | None) -> BrokerTask:
        return BrokerTask(
            task_id=new_task_id(),
            tenant=prepared.tenant,
            mode=prepared.mode,
            limits=prepared.limits,
            submitted_at=self.clock(),
            submitted_wall=datetime.now(UTC),
            settings=prepared.settings,
            output_schema=prepared.output_schema,
            idempotency_key=idempotency[0] if idempotency else None,
            fingerprint=idempotency[1] if idempotency else None,
            retry=prepared.retry,
        )

    def replay(self, tenant: str, key: str, fingerprint: str) -> BrokerTask | None:
        """The task ``tenant`` submitted with Idempotency-Key ``key`` (while it is kept),
        or None. Raises :class:`IdempotencyKeyReused` if that request was another."""
        return self._ledger.replay(tenant, key, fingerprint)

    def get(self, task_id: str) -> BrokerTask | None:
        task = self._tasks.get(task_id)
        if task is not None or self._shared is None:
            return task
        stored = self._shared.load(task_id)
        return None if stored is None else self._ledger.view(stored)

    def summary(self, task: BrokerTask) -> dict[str, Any]:
        """A task's state as the API shows it: ``waitReason`` while it is queued."""
        waiting = self.waiting(task)
        return {**task.summary(), "waitReason": waiting.as_json() if waiting else None}

    def waiting(self, task: BrokerTask) -> Waiting | None:
        """Why ``task`` has not started yet; None once it has (or has finished)."""
        if self._shared is not None and not self.is_held(task) and not task.status.is_finished:
            if task.status is not TaskStatus.QUEUED:
                return None
            # In the shared queue: whether this broker has runners says nothing (the
            # others may have); none of the brokers has had a free slot for it yet.
            return Waiting(
                WaitReason.RUNNERS_BUSY,
                "Queued in the shared queue (Redis): the first broker with a free runner "
                "slot takes it; every runner of every broker is busy, or none is connected.",
            )
        return waiting_for(
            task,
            now=self.clock(),
            is_draining=self._draining,
            no_runner_since=self._runners.no_runner_since,
            active=self._tenants.active(task.tenant),
            quota=self._quota(task.tenant),
        )

    def recent(self, tenant: str, limit: int, status: TaskStatus | None = None) -> list[BrokerTask]:
        if self._shared is not None:
            value = None if status is None else status.value
            mine = {t.task_id: t for t in self._tasks if t.tenant == tenant}
            return [
                mine.get(stored.task_id) or self._ledger.view(stored)
                for stored in self._shared.recent(tenant, limit, value)
            ]
        return self._tasks.recent(tenant, limit, status)

    def cancel(self, task: BrokerTask) -> None:
        if task.status.is_finished or task.parked is not None:
            return  # (a parked result is in: past cancelling, its verdict ends the task)
        if self._shared is not None and not self.is_held(task):
            self._cancel_elsewhere(task)
            return
        if task.status is TaskStatus.QUEUED:
            self._tenants.unqueue(task.tenant, task.task_id)
            self._finish(task, error_body(CANCELLED_MESSAGE, "", ErrorCode.CANCELLED, Stage.QUEUE))
            return
        self._tell_runner_cancel(task, "Task was cancelled by the API caller")
        self._finish(task, error_body(CANCELLED_MESSAGE, "", ErrorCode.CANCELLED, Stage.RUN))

    def in_flight(self) -> list[BrokerTask]:
        """The tasks a runner has: offered or running."""
        return self._tasks.in_flight()

    def running_count(self) -> int:
        return len(self._tasks.in_flight())

    def state(self) -> dict[str, int]:
        """Counts for the metrics gauges: runners, live offers, queued and running tasks."""
        return {
            "runners": len(self._runners.registered()),
            "open_offers": self._runners.open_offers(self.clock()),
            "queued_tasks": self._tenants.queued_count(),
            "running_tasks": self.running_count(),
        }

    # -- dispatch -----------------------------------------------------------------------

    def dispatch(self) -> None:
        """Match queued tasks to live offers, fairly across tenants."""
        if self._draining:
            return
        while True:
            offer = self._runners.best_offer(self.clock())
            if offer is None:
                return
            tenant = self._tenants.next_tenant(self._quota)
            if tenant is None:
                return
            runner, offer_id = offer
            task = self._tasks[self._tenants.pop(tenant)]
            task.status = TaskStatus.OFFERED
            task.runner_id, task.offer_id = runner.connection.runner_id, offer_id
            self._tenants.activate(tenant)
            if not self._ledger.leased(task, running=False):
                self._let_go(task)  # another broker's now (this one's lease lapsed)
                continue
            del runner.offers[offer_id]
            self._arm(task, self.config.accept_timeout_s, TaskTimer.ACCEPT)
            runner.connection.send(TaskOfferAccept(task_id=task.wire_id, offer_id=offer_id))

    def _timeout_s(self, task: BrokerTask) -> float:
        """The task's own timeout: asked for, else its tenant's profile's, else the default."""
        default = self.config.tenant_timeouts_s.get(task.tenant, self.config.default_timeout_s)
        return task.limits.timeout_s or default

    def _quota(self, tenant: str) -> int:
        return self.config.tenant_quotas.get(tenant, self.config.tenant_quota)

    def _release(self, task: BrokerTask) -> None:
        if task.status in (TaskStatus.OFFERED, TaskStatus.RUNNING):
            self._tenants.release(task.tenant)

    def _requeue(self, task: BrokerTask, cause: str) -> None:
        self._metrics.requeues.labels(cause=cause).inc()
        self._release(task)
        task.status, task.runner_id, task.offer_id = TaskStatus.QUEUED, None, None
        if self._shared is not None:
            # Back to the shared queue: whichever broker has a slot first takes it.
            self._ledger.requeued(task)
            self._let_go(task)
            return
        self._ledger.requeued(task)
        self._tenants.queue(task.tenant, task.task_id, front=True)
        self._arm(task, self.config.queue_timeout_s, TaskTimer.QUEUE)

    # -- protocol steps -----------------------------------------------------------------

    def _accepted(self, runner_id: str, task_id: str) -> None:
        task = self._ledger.current(task_id)
        runner = self._runners.get(runner_id)
        assert runner is not None  # only a current connection's messages get here
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
            runner.connection.send(TaskCancel(task_id=task_id, reason=NOT_WANTED_REASON))
            return
        task.status = TaskStatus.RUNNING
        # Durable before the settings leave: an execution may start under this attempt.
        if not self._ledger.leased(task, running=True):
            runner.connection.send(TaskCancel(task_id=task_id, reason=NOT_WANTED_REASON))
            self._let_go(task)  # another broker's now (this one's lease lapsed)
            self.dispatch()
            return
        task.started_at = self.clock()
        self._metrics.queue_wait.observe(task.started_at - task.submitted_at)
        self._arm(task, self._timeout_s(task) + self.config.timeout_grace_s, TaskTimer.RUN)
        connection = runner.connection
        try:
            if task.settings is None:
                raise RuntimeError("the task's settings are gone")
            connection.send_frame(settings_frame(task.wire_id, task.settings))
        except Exception as exc:
            # The settings were encoded at submission, so this is a bug, not the
            # tenant's data; whatever it is, the runner now holds a slot waiting for
            # settings that will not come (n8n's runner waits forever, ours until the
            # broker's task timer). Free the slot and end the task now, with the cause.
            log.exception(
                "task %s: sending its settings failed", task_id, extra={"taskId": task_id}
            )
            connection.send(TaskCancel(task_id=task_id, reason=NOT_SENT_REASON))
            body = error_body(
                "The broker could not send the task's settings to the runner",
                f"{type(exc).__name__}: {exc}"[:500],
                ErrorCode.DISPATCH_FAILED,
                Stage.DISPATCH,
            )
            self._finish(task, body)
            self.dispatch()
            return
        # Sent: the runner has them now; the broker keeps only what it still needs (a
        # task its policy may try again needs them again: still counted, still held).
        retry = task.retry
        if retry is None or len(task.attempts) + 1 >= retry.max_attempts:
            self._tenants.sent(task.tenant, len(task.settings))
            task.settings = None

    def _declined(self, runner_id: str, task_id: str, reason: str) -> None:
        task = self._ledger.current(task_id)
        if task is None or task.status is not TaskStatus.OFFERED or task.runner_id != runner_id:
            return
        log.info(
            "runner %s declined task %s: %s", runner_id, task_id, reason, extra={"taskId": task_id}
        )
        self._requeue(task, "declined")
        self.dispatch()

    def _completed(self, runner_id: str, message: TaskDone | TaskErrorMessage) -> bool:
        """Take a runner's completion. Whether it was taken or dropped for good (False:
        a shared store is unreachable, the result is neither written nor refused)."""
        if self._ledger.is_stale(message.task_id, runner_id):
            return True  # an older attempt's, whose lease died with a broker: dropped, counted
        task = self._ledger.current(message.task_id)
        if task is None and self._shared is not None:
            try:
                task = self._take_over(runner_id, message.task_id)
            except InfrastructureError:
                log.exception("task %s: the shared store failed to take it over", message.task_id)
                return False
        if task is None or task.status.is_finished or task.parked is not None:
            log.info(  # (parked: its first completion is being checked)
                "completion of unknown or finished task %s dropped",
                message.task_id,
                extra={"taskId": message.task_id},
            )
            return True
        if task.runner_id != runner_id:
            log.warning(
                "task %s reported by %s, but runs on %s", task.task_id, runner_id, task.runner_id
            )
            return True
        report = message.sandbox or {}
        self._keep_prints(task, report.get("prints"))
        body = completion_body(task, message, defer=self.config.defer_result_checks)
        if body is None:  # parked: its result is in, the verdict comes to result_checked
            self._disarm(task)
            self._emit(CheckResult(task.task_id, task.attempt))
            return True
        self._finish(task, body, report.get("audit"))
        self.dispatch()
        return task.task_id not in self._ledger.unwritten

    def result_checked(self, task_id: str, attempt: int, problem: str | None) -> None:
        """The verdict on a parked result (``problem``: None, it matches the schema).
        Its result is in: its runner leaving or a cancel no longer changes the task."""
        task = self._tasks.get(task_id)
        if task is None or task.attempt != attempt or (parked := task.parked) is None:
            return
        task.parked = None
        self._finish(task, checked_body(parked.result, problem), parked.audit)
        self.dispatch()

    def _keep_prints(self, task: BrokerTask, entries: Any) -> None:
        """Keep a runner's print entries up to the broker's caps (:func:`keep_prints`);
        count what is dropped."""
        config = self.config
        if dropped := keep_prints(task, entries, config.max_print_calls, config.max_print_chars):
            self._metrics.prints_dropped.inc(dropped)

    def _finish(self, task: BrokerTask, body: dict[str, Any], audit: Any = None) -> None:
        if task.status.is_finished:
            return
        if task.retry is not None and task.status is TaskStatus.RUNNING and "error" in body:
            # An attempt a runner had failed: kept (at most max_attempts of them), then
            # tried again if the policy retries its code and has attempts left; a task
            # it retries and has none left for is a dead letter.
            error = body["error"]
            task.attempts.append(AttemptError.of(task.attempt, error, datetime.now(UTC)))
            if task.retry.retries(error["code"]):
                if len(task.attempts) < task.retry.max_attempts:
                    self._retry_later(task, error["code"])
                    return
                body = {**body, "status": TaskStatus.DEAD.value}
                self._metrics.dead_letters.labels(error_code=error["code"]).inc()
        self._release(task)
        self._tenants.finished(task.tenant, task.held_bytes)
        task.settings = task.output_schema = None
        document, body = result_document(task, body, audit)
        task.prints = []  # now in the document
        status = body["status"]
        task.status = TaskStatus(status) if status in ("success", "dead") else TaskStatus.ERROR
        task.finished_at = self.clock()
        code = body["error"]["code"] if "error" in body else ""
        self._metrics.tasks.labels(status=task.status.value, error_code=code).inc()
        if task.started_at is not None:
            self._metrics.duration.observe(task.finished_at - task.started_at)
        task.document_json = document
        self._disarm(task)
        self._emit(TaskFinished(task.task_id))
        if not self._ledger.finished(task) and self._shared is not None:
            # Another broker's now (this one's lease lapsed): its waiters here read
            # what the store holds, not the result it refused.
            task.status = TaskStatus.RUNNING
            self.refresh(task)

    def _retry_later(self, task: BrokerTask, code: str) -> None:
        """The task's policy tries the failed attempt again, at the next attempt number
        (the fence: a late result of the failed one is stale), after its back-off."""
        assert task.retry is not None
        failed, delay_s = task.attempt, task.retry.delay_s(len(task.attempts))
        self._metrics.retries.labels(error_code=code).inc()
        self._release(task)
        task.status, task.runner_id, task.offer_id = TaskStatus.QUEUED, None, None
        task.attempt += 1
        task.prints, task.print_bytes = [], 0  # the failed attempt's (its error is kept)
        if not self._ledger.retrying(task, failed):
            self._let_go(task)  # another broker's now (this one's lease lapsed)
            return
        log.info(
            "task %s: attempt %d failed (%s); attempt %d in %.1f s",
            task.task_id,
            failed,
            code,
            task.attempt,
            delay_s,
            extra={"taskId": task.task_id},
        )
        self._arm(task, delay_s, TaskTimer.RETRY)

    def _retry_due(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.QUEUED:
            return
        if self._shared is not None:
            self._ledger.requeued(task)  # due: to the shared queue, for any broker
            self._let_go(task)
            return
        # At the front of its tenant's queue, as any task handed back: it came first.
        self._tenants.queue(task.tenant, task.task_id, front=True)
        self._arm(task, self.config.queue_timeout_s, TaskTimer.QUEUE)
        self.dispatch()

    def _tell_runner_cancel(self, task: BrokerTask, reason: str) -> None:
        runner = self._runners.get(task.runner_id)
        if runner is not None and task.status is TaskStatus.RUNNING:
            runner.connection.send(TaskCancel(task_id=task.wire_id, reason=reason))

    # -- deadlines ----------------------------------------------------------------------

    def _arm(self, task: BrokerTask, delay_s: float, timer: TaskTimer) -> None:
        """``timer`` fires ``delay_s`` from now, instead of whatever the task had pending."""
        task.timer, task.deadline = timer, self.clock() + delay_s
        self._deadlines.arm(task.task_id, task.deadline)
        self._on_change()

    def _disarm(self, task: BrokerTask) -> None:
        if task.timer is not None:
            task.timer = task.deadline = None
            self._deadlines.disarm(task.task_id)
            self._on_change()

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        self._on_change()

    def _fire(self, timer: TaskTimer, task_id: str) -> None:
        match timer:
            case TaskTimer.ACCEPT:
                self._accept_timed_out(task_id)
            case TaskTimer.QUEUE:
                self._queue_expired(task_id)
            case TaskTimer.RUN:
                self._task_timed_out(task_id)
            case TaskTimer.RUNNER_LOST:
                self._runner_lost(task_id)
            case TaskTimer.RETRY:
                self._retry_due(task_id)

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
        body = error_body(
            TIMED_OUT_REASON, "The broker's task timer fired.", ErrorCode.TIMEOUT, Stage.RUN
        )
        self._finish(task, body)
        runner = self._runners.get(task.runner_id)
        if runner is not None:
            runner.connection.send(TaskCancel(task_id=task.wire_id, reason=TIMED_OUT_REASON))
        self.dispatch()

    def _queue_expired(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.QUEUED:
            return
        waiting = self.waiting(task)
        assert waiting is not None  # a queued task always has a reason
        cause = expiry_cause(
            task,
            waiting,
            no_runner_since=self._runners.no_runner_since,
            now=self.clock(),
            quota=self._quota(task.tenant),
        )
        self._tenants.unqueue(task.tenant, task.task_id)
        body = error_body(
            f"No runner took the task in time: {cause}",
            f"It waited {self.config.queue_timeout_s:g} s in the queue "
            f"(SANDBOX_QUEUE_TIMEOUT_S). {waiting.message}",
            ErrorCode.QUEUE_TIMEOUT,
            Stage.QUEUE,
        )
        self._finish(task, body)

    def _runner_lost(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status is not TaskStatus.RUNNING:
            return
        if task.runner_id in self._runners:  # it came back: wait for its report
            self._arm(task, self._timeout_s(task) + self.config.timeout_grace_s, TaskTimer.RUN)
            return
        lost = "The runner disconnected while running the task"
        self._finish(task, error_body(lost, "", ErrorCode.RUNNER_LOST, Stage.RUN))
        self.dispatch()

    # -- shutdown -----------------------------------------------------------------------

    def drain(self) -> None:
        """Stop dispatching and tell every runner to stop offering."""
        self._draining = True
        for runner in self._runners.all():
            runner.offers.clear()
            if runner.registered:
                runner.connection.send(Drain())
        self._hand_back_queued()
        self._emit(Draining())

    def close_all(self, code: int = 1001, reason: str = "broker shutting down") -> None:
        for runner in self._runners.all():
            runner.connection.close(code, reason)

    def close(self) -> None:
        """Close the store, once nothing reaches the broker any more (served no more)."""
        self._ledger.close()
