"""Test doubles shared by the broker's unit tests (``from fakes import ...``)."""

from __future__ import annotations

from typing import Any

from runner.broker_server.core import Broker
from runner.protocol.messages import RunnerInfo, TaskOffer


class FakeRunner:
    """A runner connection to the broker core that records what it was sent."""

    def __init__(self, runner_id: str = "r1") -> None:
        self.runner_id = runner_id
        self.sent: list[Any] = []
        self.closed: tuple[int, str] | None = None

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


def connect(broker: Broker, runner_id: str = "r1", offers: int = 0) -> FakeRunner:
    """A registered fake runner with ``offers`` live offers."""
    runner = FakeRunner(runner_id)
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    for index in range(offers):
        broker.runner_message(runner, TaskOffer(offer_id=f"{runner_id}-o{index}", valid_for=5000))
    return runner
