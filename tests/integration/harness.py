"""An embedded broker in the test's event loop and `sandbox-runner serve` processes.

The runner is started exactly as an operator would start it (a separate process,
configured by environment variables); the broker runs in-process so tests can read
every message a runner sent (:class:`RecordingBroker`, the broker core that
:func:`start_broker` serves) and submit tasks directly.
"""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from typing import Any

from helpers import until
from pydantic import BaseModel

from runner.broker_server.core import Broker
from runner.broker_server.runners import RunnerConnection
from runner.broker_server.server import RunningBroker, running_broker
from runner.broker_server.submission import Submission
from runner.broker_server.tasks import BrokerTask
from runner.sandbox.base import Mode
from runner.settings import Settings
from runner.testing import ServeProcess

AUTH_TOKEN = "test-auth-token-0123456789"


def broker_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_host": "127.0.0.1",
        "broker_port": 0,
        "auth_token": AUTH_TOKEN,
        "graceful_shutdown_timeout_s": 5,
        "runner_id": "pytest-broker",
    }
    values.update(overrides)
    return Settings(**values)


class RecordingBroker(Broker):
    """The broker core, recording at its boundary with the web layer: every message a
    runner sent, once ``log_messages`` is set (``message_log``: runner id and the
    message as on the wire), and each runner's current connection
    (:meth:`connection`), through which a test sends what a faulty broker would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_messages = False
        self.message_log: list[tuple[str, dict[str, Any]]] = []
        self._connections: dict[str, RunnerConnection] = {}

    def runner_connected(self, connection: RunnerConnection) -> None:
        self._connections[connection.runner_id] = connection
        super().runner_connected(connection)

    def runner_disconnected(self, connection: RunnerConnection) -> None:
        if self._connections.get(connection.runner_id) is connection:
            del self._connections[connection.runner_id]
        super().runner_disconnected(connection)

    def runner_message(self, connection: RunnerConnection, message: BaseModel) -> None:
        if self.log_messages:
            self.message_log.append(
                (connection.runner_id, message.model_dump(mode="json", by_alias=True))
            )
        super().runner_message(connection, message)

    def connection(self, runner_id: str) -> RunnerConnection | None:
        return self._connections.get(runner_id)


def start_broker(**overrides: Any) -> AbstractAsyncContextManager[RunningBroker]:
    return running_broker(
        broker_settings(**overrides), auth_token=AUTH_TOKEN, broker_factory=RecordingBroker
    )


class RunnerProcess(ServeProcess):
    """`sandbox-runner serve` in its own process, with quick timeouts for tests."""

    def __init__(self, broker_url: str, env: dict[str, str] | None = None) -> None:
        super().__init__(
            broker_url,
            AUTH_TOKEN,
            {
                "N8N_RUNNERS_TASK_TIMEOUT": "2",
                "N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED": "true",
                "N8N_RUNNERS_HEALTH_CHECK_SERVER_PORT": "0",
                "N8N_RUNNERS_GRACEFUL_SHUTDOWN_TIMEOUT": "3",
                "SANDBOX_RECONNECT_BACKOFF_MAX_S": "1",
                **(env or {}),
            },
        )
        self.runner_id = ""

    def _announced_id(self) -> str:
        match = re.search(r"Runner ([A-Za-z0-9]{22}) starting", self.output)
        return match.group(1) if match else ""

    async def wait_connected(self, broker: Broker, timeout_s: float = 30) -> str:
        """The runner's id (from its own start-up line) once it registered with ``broker``."""
        self.runner_id = await until(
            lambda: self._announced_id() or self.process.poll() is not None,
            timeout_s,
            "the runner to start",
        )
        assert self.process.poll() is None, self.output
        await until(
            lambda: self.runner_id in broker.runner_ids() or self.process.poll() is not None,
            timeout_s,
            f"runner {self.runner_id} to register",
        )
        assert self.process.poll() is None, self.output
        return self.runner_id

    @property
    def health_port(self) -> int:
        match = re.search(r"Health check server listening on [\d.]+, port (\d+)", self.output)
        assert match, self.output
        return int(match.group(1))


def submit(
    broker: Broker,
    code: str,
    items: list[Any] | None = None,
    mode: str = "all_items",
    tenant: str = "default",
    **kw: Any,
) -> BrokerTask:
    return broker.submit(
        Submission(
            tenant=tenant,
            code=code,
            items=items or [],
            mode=Mode.parse(mode),
            **kw,
        )
    )


async def finished(task: BrokerTask, timeout_s: float = 30) -> dict[str, Any]:
    await until(lambda: task.document_json is not None, timeout_s, f"task {task.task_id} to end")
    assert task.document is not None
    return task.document


def wire(broker: Broker, task_id: str) -> list[dict[str, Any]]:
    """Every message runners sent about one task, in order (a :class:`RecordingBroker`'s)."""
    return [m for _, m in broker.message_log if m.get("taskId") == task_id]


def completions(broker: Broker, task_id: str) -> list[dict[str, Any]]:
    return [
        m for m in wire(broker, task_id) if m["type"] in ("runner:taskdone", "runner:taskerror")
    ]
