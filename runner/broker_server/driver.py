"""The broker core's side of the event loop: its timer, and whoever waits on it.

Owns: running the sans-I/O core (:class:`runner.broker_server.core.Broker`) in time,
and the asyncio side of waiting for what it reports:

- the timer: one loop timer set for :meth:`Broker.next_deadline`; when it fires, the
  driver calls :meth:`Broker.tick` with the core's own clock. The core calls back
  (:meth:`Broker.subscribe`) whenever its deadlines or events may have changed; the
  driver then reads the events and sets the timer again, once the core's call has
  returned (the callback only schedules, so the core is never re-entered);
- waits: a task's end (the API's long-polls, :meth:`BrokerDriver.wait_finished`), the
  start of a drain (:meth:`BrokerDriver.wait_closing`), and every dispatched task's
  end within a bound (:meth:`BrokerDriver.wait_idle`), from the core's
  ``TaskFinished`` and ``Draining`` events;
- callers' schemas off the event loop (its :class:`~runner.broker_server.schema_pool.
  SchemaPool`, which the API's submit route uses too): for each ``CheckResult`` event
  (a result the core parked, its runner's slot already free), one owned asyncio task
  checks it in a worker and hands the verdict to :meth:`Broker.result_checked`. The
  task stays ``running`` meanwhile, with no timer: its result is in, so neither its
  timeout nor its runner leaving can end it, and a cancel no longer applies; whatever
  happens to the check (a limit, a fault of ours), a verdict comes back, so the task
  always ends. At shutdown the server waits for running tasks (parked ones included)
  before :meth:`BrokerDriver.aclose` cancels what is left and stops the workers.

One loop timer re-set, rather than a task that sleeps: there is nothing to start or
to cancel at shutdown, whoever serves the app (uvicorn without lifespan events,
httpx's ASGI transport in tests). The loop is the running one at each call, so an app
that is served by several loops in turn (a test client's) keeps its timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from runner.broker_server.core import Broker
from runner.broker_server.events import CheckResult, Draining, TaskFinished, TaskLetGo
from runner.broker_server.schema_pool import SchemaPool
from runner.broker_server.tasks import BrokerTask
from runner.errors import InfrastructureError

log = logging.getLogger(__name__)

#: The largest data a schema check gets when the pool is the driver's own (the API's
#: default request cap and a runner's default output cap, 16 MiB).
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


class BrokerDriver:
    """Drives ``broker`` from the running event loop; subscribes to it at once.

    ``schemas``: the pool that checks callers' schemas (the server's, sized for its
    payload caps; it closes it). Without one the driver makes its own, stopped by
    :meth:`aclose` or by the pool's finalizer.
    """

    def __init__(self, broker: Broker, schemas: SchemaPool | None = None) -> None:
        self.broker = broker
        self.schemas = schemas or SchemaPool(max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES)
        self._own_schemas = schemas is None
        self._checks: set[asyncio.Task[None]] = set()  # results being checked
        self._finished: dict[str, list[asyncio.Future[None]]] = {}  # task id -> waiters
        # Waiters for tasks another broker holds (a shared store), by task id.
        self._elsewhere: dict[str, list[asyncio.Future[None]]] = {}
        self._on_update: list[Callable[[], None]] = []
        self._closing: list[asyncio.Future[None]] = []
        self._pump: asyncio.Handle | None = None  # an update scheduled, on _pump_loop
        self._pump_loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # set for _timer_at, on _timer_loop
        self._timer_at: float | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._updating = False
        self._closed = False
        broker.subscribe(self._changed)
        # A broker that took over tasks from its store has deadlines already.
        self._changed()

    def drain(self) -> None:
        """Start the broker's drain (the long-polls of queued tasks answer at once)."""
        self.broker.drain()

    def close(self) -> None:
        """Stop timing the broker (at shutdown, once it is drained)."""
        self._closed = True
        for handle in (self._pump, self._timer):
            if handle is not None:
                handle.cancel()
        self._pump = self._timer = None

    async def aclose(self) -> None:
        """:meth:`close`, cancel the result checks still under way (their tasks stay
        running, for the next broker on the store to run again), and stop the schema
        workers if the pool is the driver's own."""
        self.close()
        checks = list(self._checks)
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        if self._own_schemas:
            await self.schemas.aclose()

    # -- waits ----------------------------------------------------------------------------

    def on_update(self, callback: Callable[[], None]) -> None:
        """Be called after each update of the core (its events read, its timer set)."""
        self._on_update.append(callback)

    def finished_elsewhere(self, task_id: str) -> None:
        """Another broker says ``task_id`` finished: its waiters here look."""
        self._wake(self._elsewhere.pop(task_id, []))

    async def wait_finished(
        self, task: BrokerTask, timeout_s: float | None = None, *, follow: bool = True
    ) -> bool:
        """Until ``task`` has finished, at most ``timeout_s`` (None: no bound). Finished?

        A shared store's task this broker does not hold (any more) is followed in the
        store; ``follow=False``: only while this broker holds it (a drain's wait)."""
        if task.status.is_finished:
            return True
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        if self.broker.is_held(task):
            future = loop.create_future()
            waiters = self._finished.setdefault(task.task_id, [])
            waiters.append(future)
            try:
                await asyncio.wait([future], timeout=timeout_s)
            finally:
                future.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(future)
                if not waiters and self._finished.get(task.task_id) is waiters:
                    del self._finished[task.task_id]
            if task.status.is_finished or self.broker.is_held(task) or not follow:
                return task.status.is_finished
        if not follow:
            return False
        left = None if deadline is None else max(0.0, deadline - loop.time())
        return await self._wait_elsewhere(task, left)

    async def _wait_elsewhere(self, task: BrokerTask, timeout_s: float | None) -> bool:
        """``task`` is a shared store's snapshot (another broker holds it, or none yet):
        re-read when a broker says it finished, and every second (a missed message, or
        this broker claiming it meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._refreshed(task):
            held = self.broker.get(task.task_id)
            if held is not None and self.broker.is_held(held):
                # Claimed here meanwhile: wait for this broker's own object, then copy it.
                left = None if deadline is None else max(0.0, deadline - loop.time())
                await self.wait_finished(held, left)
                return self._refreshed(task)
            left = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if left <= 0:
                return False
            future = loop.create_future()
            waiters = self._elsewhere.setdefault(task.task_id, [])
            waiters.append(future)
            try:
                await asyncio.wait([future], timeout=left)
            finally:
                future.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(future)
                if not waiters and self._elsewhere.get(task.task_id) is waiters:
                    del self._elsewhere[task.task_id]
        return True

    def _refreshed(self, task: BrokerTask) -> bool:
        """:meth:`Broker.refresh`; False while the shared store cannot be read (the wait
        goes on, and reads it again)."""
        try:
            return self.broker.refresh(task)
        except InfrastructureError as exc:
            log.warning("task %s: the shared store cannot be read: %s", task.task_id, exc)
            return False

    async def wait_closing(self) -> None:
        """Until the broker starts to drain."""
        if self.broker.is_draining:
            return
        future = asyncio.get_running_loop().create_future()
        self._closing.append(future)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._closing.remove(future)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until every dispatched task has finished. Has each?"""
        waits = [
            asyncio.ensure_future(self.wait_finished(task, follow=False))
            for task in self.broker.in_flight()
        ]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return self.broker.running_count() == 0

    # -- the timer ------------------------------------------------------------------------

    def _changed(self) -> None:
        """The core's callback: schedule an update for when its call has returned."""
        if self._updating or self._closed:
            return  # an update is under way: it reads everything once tick returns
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Never raise into the core, mid-change. Called outside a loop (nobody can
            # be waiting there): the next change made from a loop sets the timer.
            return
        if self._pump is None or self._pump_loop is not loop:
            self._pump, self._pump_loop = loop.call_soon(self._update), loop

    def _update(self) -> None:
        """Fire what is due, hand the core's events to their waiters, set the timer."""
        self._pump = None
        self._updating = True
        try:
            self.broker.tick(self.broker.clock())
            for event in self.broker.events():
                match event:
                    case TaskFinished(task_id=task_id) | TaskLetGo(task_id=task_id):
                        self._wake(self._finished.pop(task_id, []))
                    case Draining():
                        self._wake(self._closing)
                    case CheckResult(task_id=task_id, attempt=attempt):
                        check = asyncio.get_running_loop().create_task(
                            self._check_result(task_id, attempt)
                        )
                        self._checks.add(check)
                        check.add_done_callback(self._checks.discard)
        finally:
            self._updating = False
            self._set_timer()
            for callback in self._on_update:
                callback()

    async def _check_result(self, task_id: str, attempt: int) -> None:
        """A parked result checked in a worker; the verdict handed back, whatever happens."""
        task = self.broker.get(task_id)
        if task is None or task.parked is None or task.output_schema is None:
            return
        try:
            problem = await self.schemas.check_result(
                task.tenant, task.output_schema, task.parked.result
            )
        except Exception as exc:  # a fault of ours: the task still ends, with no traceback
            log.exception("task %s: checking its result failed", task_id)
            problem = (
                f"result: the broker could not check it against the schema ({type(exc).__name__})"
            )
        self.broker.result_checked(task_id, attempt, problem)

    def _set_timer(self) -> None:
        if self._closed:
            return
        deadline = self.broker.next_deadline()
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer_at == deadline and self._timer_loop is loop:
                return  # already set for it
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        delay_s = max(0.0, deadline - self.broker.clock())
        self._timer = loop.call_later(delay_s, self._timer_fired)
        self._timer_at, self._timer_loop = deadline, loop

    def _timer_fired(self) -> None:
        self._timer = None
        self._update()

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for future in list(waiters):
            # A waiter of a loop that has gone (a test client's) has nobody to wake.
            if not future.done() and not future.get_loop().is_closed():
                future.set_result(None)
