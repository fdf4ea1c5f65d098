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
  ``TaskFinished`` and ``Draining`` events.

One loop timer re-set, rather than a task that sleeps: there is nothing to start or
to cancel at shutdown, whoever serves the app (uvicorn without lifespan events,
httpx's ASGI transport in tests). The loop is the running one at each call, so an app
that is served by several loops in turn (a test client's) keeps its timer.
"""

from __future__ import annotations

import asyncio
import contextlib

from runner.broker_server.core import Broker, Draining, TaskFinished
from runner.broker_server.tasks import BrokerTask


class BrokerDriver:
    """Drives ``broker`` from the running event loop; subscribes to it at once."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._finished: dict[str, list[asyncio.Future[None]]] = {}  # task id -> waiters
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

    # -- waits ----------------------------------------------------------------------------

    async def wait_finished(self, task: BrokerTask, timeout_s: float | None = None) -> bool:
        """Until ``task`` has finished, at most ``timeout_s`` (None: no bound). Finished?"""
        if task.status.is_finished:
            return True
        future = asyncio.get_running_loop().create_future()
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
        return task.status.is_finished

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
            asyncio.ensure_future(self.wait_finished(task)) for task in self.broker.in_flight()
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
                    case TaskFinished(task_id=task_id):
                        self._wake(self._finished.pop(task_id, []))
                    case Draining():
                        self._wake(self._closing)
        finally:
            self._updating = False
            self._set_timer()

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
