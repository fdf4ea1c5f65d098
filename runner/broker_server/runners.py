"""The runners connected to the broker, and the offers they made.

Owns: the registry of runner connections by runner id (one per id: a new connection
with the same id replaces the old one), which of them have registered
(``runner:info``), since when the broker has had no registered runner, each runner's
offers with their validity (``validFor``, from the broker's clock; -1: never
expires), and which live offer a task takes (the newest).

An offer's validity is checked where it is used (dispatch, the open-offers gauge):
nothing needs to happen when one lapses, so offers are no deadlines of the core's.

What a connection is to the core: :class:`RunnerConnection`, a non-blocking ``send``
and ``close`` (the web layer's WebSocket, a fake in unit tests). No I/O, no clock of
its own: times come from the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel


class RunnerConnection(Protocol):
    """One connected runner, as the web layer gives it to the core."""

    runner_id: str

    def send(self, message: BaseModel) -> None: ...
    def send_frame(self, frame: str) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


@dataclass
class ConnectedRunner:
    connection: RunnerConnection
    registered: bool = False
    offers: dict[str, float] = field(default_factory=dict)  # offer id -> valid until (-1: never)

    def offer(self, offer_id: str, valid_for_ms: float, now: float) -> None:
        self.offers[offer_id] = -1.0 if valid_for_ms < 0 else now + valid_for_ms / 1000


class Runners:
    """Connected runners by id. ``now``: the broker's clock when the registry starts."""

    def __init__(self, now: float) -> None:
        self._runners: dict[str, ConnectedRunner] = {}
        # When the broker last had no registered runner (None while it has one): a task
        # that waits longer than this has never had a runner to go to.
        self.no_runner_since: float | None = now

    def connect(self, connection: RunnerConnection, now: float) -> ConnectedRunner | None:
        """Add a connection; return the one it replaces (same runner id), if any."""
        previous = self._runners.get(connection.runner_id)
        self._runners[connection.runner_id] = ConnectedRunner(connection)
        self._changed(now)
        return previous

    def disconnect(self, connection: RunnerConnection, now: float) -> bool:
        """Forget a connection; False when it was not (or no longer) the current one."""
        if self.of(connection) is None:
            return False
        del self._runners[connection.runner_id]
        self._changed(now)
        return True

    def register(self, runner: ConnectedRunner, now: float) -> None:
        runner.registered = True
        self._changed(now)

    def of(self, connection: RunnerConnection) -> ConnectedRunner | None:
        """The runner of this connection, unless another one has replaced it."""
        runner = self._runners.get(connection.runner_id)
        return runner if runner is not None and runner.connection is connection else None

    def get(self, runner_id: str | None) -> ConnectedRunner | None:
        return self._runners.get(runner_id or "")

    def __contains__(self, runner_id: object) -> bool:
        return runner_id in self._runners

    def all(self) -> list[ConnectedRunner]:
        return list(self._runners.values())

    def registered(self) -> list[ConnectedRunner]:
        return [runner for runner in self._runners.values() if runner.registered]

    def ids(self) -> list[str]:
        """The ids of the registered runners."""
        return [rid for rid, runner in self._runners.items() if runner.registered]

    def open_offers(self, now: float) -> int:
        return sum(
            1
            for runner in self.registered()
            for until in runner.offers.values()
            if until < 0 or until > now
        )

    def best_offer(self, now: float) -> tuple[ConnectedRunner, str] | None:
        """The newest live offer of any registered runner (n8n's broker takes the first).

        Expired offers met on the way are forgotten; the one returned is left in place.
        """
        best: tuple[float, ConnectedRunner, str] | None = None
        for runner in self.registered():
            for offer_id, until in list(runner.offers.items()):
                if 0 <= until <= now:
                    del runner.offers[offer_id]
                    continue
                rank = float("inf") if until < 0 else until
                if best is None or rank > best[0]:
                    best = (rank, runner, offer_id)
        return None if best is None else (best[1], best[2])

    def _changed(self, now: float) -> None:
        if any(runner.registered for runner in self._runners.values()):
            self.no_runner_since = None
        elif self.no_runner_since is None:
            self.no_runner_since = now
