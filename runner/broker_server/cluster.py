"""A broker's part in a task store shared with other brokers (Redis): its lease, the
shared queue, and what the other brokers say.

Owns, on the event loop, for a core over a :class:`~runner.broker_server.store.
SharedStore`:

- the lease: renewed every third of ``SANDBOX_BROKER_LEASE_S``; at each renewal the
  tasks of brokers whose lease lapsed are put back in the shared queue
  (:meth:`SharedStore.reclaim`, counted as requeues, cause ``broker_lost``);
- orphans: at each renewal, a task the store has as this broker's that the core does
  not hold (a hand-back the store missed while it was unreachable) goes back to the
  queue (:meth:`SharedStore.give_back_orphans`, cause ``orphaned``);
- claiming: whenever the core may have runner slots that no task here waits for
  (:meth:`Broker.spare`: after any change of the core, when another broker queued a
  task, and every half second), that many tasks are claimed from the shared queue,
  none of a tenant at its quota here (:meth:`Broker.at_quota`), and handed to the core
  (:meth:`Broker.adopt`);
- results the store failed to take (Redis unreachable when the task ended): written
  again at each round (:meth:`Broker.write_unwritten`) until it takes them;
- the channels: a task finished on another broker wakes who waits for it here
  (:meth:`BrokerDriver.finished_elsewhere`); a cancel asked of another broker's API
  reaches the core that holds the task (:meth:`Broker.cancel_requested`).

A fault of Redis is logged (once per outage) and retried every second: the core goes
on with what it holds; a broker cut off longer than its lease finds its tasks taken
by others (the store's fence) and lets them go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runner.broker_server.core import Broker
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.store import SharedStore
from runner.errors import InfrastructureError
from runner.metrics import BrokerMetrics

log = logging.getLogger(__name__)

CLAIM_POLL_S = 0.5  # claim at least this often (a missed channel message costs this)
FAULT_RETRY_S = 1.0


class ClusterLink:
    def __init__(self, driver: BrokerDriver, store: SharedStore, metrics: BrokerMetrics) -> None:
        self.driver = driver
        self.broker: Broker = driver.broker
        self.store = store
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._failing = False
        driver.on_update(self._wake.set)

    async def run(self) -> None:
        """Until cancelled."""
        listener = asyncio.create_task(self._listen())
        try:
            await self._loop()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        renew_every = self.store.lease_s / 3
        next_renewal = loop.time()
        while True:
            try:
                if loop.time() >= next_renewal:
                    self.store.renew()
                    _, _, requeued = self.store.reclaim()
                    if requeued:
                        self._metrics.requeues.labels(cause="broker_lost").inc(requeued)
                    if orphans := self.store.give_back_orphans(self.broker.held_ids()):
                        self._metrics.requeues.labels(cause="orphaned").inc(orphans)
                    next_renewal = loop.time() + renew_every
                self._wake.clear()
                self.broker.write_unwritten()
                if (spare := self.broker.spare()) > 0 and (
                    claimed := self.store.claim(spare, self.broker.at_quota())
                ):
                    self.broker.adopt(claimed)
                if self._failing:
                    log.warning("the Redis task store %s answers again", self.store.location)
                    self._failing = False
            except InfrastructureError as exc:
                if not self._failing:
                    log.error("the Redis task store fails: %s (retrying every second)", exc)
                    self._failing = True
                await asyncio.sleep(FAULT_RETRY_S)
                continue
            timeout = max(0.0, min(CLAIM_POLL_S, next_renewal - loop.time()))
            # (Not asyncio.wait_for: on 3.11 it can swallow a cancel that comes as the
            # event is set, and the link would never stop.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _listen(self) -> None:
        while True:
            try:
                async for channel, message in self.store.listen():
                    match channel:
                        case "ready":
                            self._wake.set()
                        case "done":
                            self.driver.finished_elsewhere(message)
                        case "cancel":
                            self.broker.cancel_requested(message)
            except InfrastructureError as exc:
                log.warning("listening to the other brokers failed: %s; again in 1 s", exc)
            await asyncio.sleep(FAULT_RETRY_S)
