"""Test doubles shared by the broker's unit tests (``from fakes import ...``)."""

from __future__ import annotations

from typing import Any

from runner.broker_server.core import Broker
from runner.protocol.codec import decode_broker_message
from runner.protocol.messages import RunnerInfo, TaskOffer


class FakeClock:
    """A clock that moves only when told (``clock.now += 2``): the broker core's deadlines
    fire when a test calls ``broker.tick(clock())`` after moving it (:func:`advance`)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def advance(broker: Broker, clock: FakeClock, seconds: float) -> None:
    """Move ``clock`` on by ``seconds`` and fire what is due, as the web layer's timer would."""
    clock.now += seconds
    broker.tick(clock())


class FakeRunner:
    """A runner connection to the broker core that records what it was sent.

    Raw frames (the settings, encoded at submission) are kept in ``frames`` and also
    decoded into ``sent`` as a runner would read them, so tests see one message list.
    """

    def __init__(self, runner_id: str = "r1") -> None:
        self.runner_id = runner_id
        self.sent: list[Any] = []
        self.frames: list[str] = []
        self.closed: tuple[int, str] | None = None

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def send_frame(self, frame: str) -> None:
        self.frames.append(frame)
        self.sent.append(decode_broker_message(frame))

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
