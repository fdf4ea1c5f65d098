"""What the broker core reports to the web layer: its events, as data.

Owns: the events :meth:`runner.broker_server.core.Broker.events` returns, oldest first:
a task that finished (its waiters may go), one this broker let go (a shared store's),
the start of a drain, and a result that
waits for a check off the event loop (:class:`CheckResult`). The driver
(:mod:`runner.broker_server.driver`) acts on each. No I/O; imports nothing of the
project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """The task has its result document now (its waiters may go)."""

    task_id: str


@dataclass(frozen=True, slots=True)
class TaskLetGo:
    """This broker no longer holds the task (a shared store's: handed back to the
    queue, or another broker's since): its waiters here follow it in the store."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Draining:
    """The broker has started to drain: it dispatches nothing more."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The task's result is parked (``BrokerTask.parked``): check it against its
    ``outputSchema`` off the event loop and hand the verdict to
    :meth:`~runner.broker_server.core.Broker.result_checked` with this ``attempt``."""

    task_id: str
    attempt: int


Event = TaskFinished | TaskLetGo | Draining | CheckResult
