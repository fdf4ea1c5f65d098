"""An embedded broker in the test's event loop and `sandbox-runner serve` processes.

The runner is started exactly as an operator would start it (a separate process,
configured by environment variables); the broker runs in-process so tests can read
every message a runner sent (``Broker.message_log``) and submit tasks directly.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from runner.broker_server.core import Broker, BrokerTask, Submission
from runner.broker_server.server import RunningBroker, running_broker
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


def start_broker(**overrides: Any) -> AbstractAsyncContextManager[RunningBroker]:
    return running_broker(broker_settings(**overrides), auth_token=AUTH_TOKEN)


async def until(predicate: Callable[[], Any], timeout_s: float = 20, what: str = "") -> Any:
    """Wait for a condition in an end-to-end test (real processes, real time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


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
    await asyncio.wait_for(task.done.wait(), timeout_s)
    assert task.document is not None
    return task.document


def wire(broker: Broker, task_id: str) -> list[dict[str, Any]]:
    """Every message runners sent about one task, in order."""
    return [m for _, m in broker.message_log if m.get("taskId") == task_id]


def completions(broker: Broker, task_id: str) -> list[dict[str, Any]]:
    return [
        m for m in wire(broker, task_id) if m["type"] in ("runner:taskdone", "runner:taskerror")
    ]
