"""A completion written into a dying socket is sent again, not lost (``sandbox-ack``).

n8n's protocol has no acknowledgement: a ``runner:taskdone`` the runner handed to its
socket just before the connection died is gone, and the task ends ``runner_lost`` (or
is run again) although it finished. Between our runner and our broker, the completion
asks for a ``broker:taskack`` and the runner keeps it until then. Here the embedded
broker and the runner service talk over a real WebSocket; only the sandbox is a
recorder, and the runner's socket "sends" the first completion frame into nothing and
then drops the connection, as a dying TCP connection would.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from runner.broker_server.server import running_broker
from runner.cli.wiring import make_pipeline
from runner.sandbox.base import ExecutionResult, Limits, Outcome, TaskSpec
from runner.service import RunnerService
from runner.settings import PROJECT_ROOT, Settings

AUTH = "ack-test-token-0123456789"
KEY = "ack-test-key-0123456789"


class RecordingSandbox:
    def __init__(self) -> None:
        self.runs: list[str] = []

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        self.runs.append(spec.task_id)
        return ExecutionResult(Outcome.SUCCESS, result=[{"json": {"n": 42}}], container_id="c1")

    async def cancel(self, task_id: str) -> bool:
        return False

    async def aclose(self) -> None:
        return None


def settings() -> Settings:
    return Settings(
        policy_dir=PROJECT_ROOT / "policies",
        broker_host="127.0.0.1",
        broker_port=0,
        auth_token=AUTH,
        api_keys=f"{KEY}=acme",
        max_concurrency=1,
        graceful_shutdown_timeout_s=2,
        reconnect_backoff_max_s=0.2,
        runner_id="ack-unit",
    )


async def test_a_completion_lost_in_a_dying_socket_is_sent_again_and_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lost: list[str] = []
    real_send = ClientConnection.send

    async def send(self: ClientConnection, message: Any, *args: Any, **kwargs: Any) -> None:
        if not lost and isinstance(message, str) and '"runner:taskdone"' in message:
            lost.append(json.loads(message)["taskId"])
            self.transport.abort()  # written, never read: the connection dies with it
            return
        await real_send(self, message, *args, **kwargs)

    monkeypatch.setattr(ClientConnection, "send", send)
    sandbox = RecordingSandbox()
    pipeline = make_pipeline(settings(), sandbox, image="task:test", image_id=None, isolation={})
    async with running_broker(settings(), auth_token=AUTH) as running:
        service = RunnerService(settings(), pipeline, broker_uri=running.url, handle_signals=False)
        serving = asyncio.create_task(service.run())
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                response = await client.post(
                    "/v1/tasks",
                    params={"wait": 20},
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={"code": "return [{'json': {'n': 42}}]", "items": []},
                )
            document = response.json()
        finally:
            service.request_shutdown("test over")
            assert await asyncio.wait_for(serving, 10) == 0
            await pipeline.aclose()
    assert lost, "the first completion frame was never sent"
    assert response.status_code == 200, document
    # The task finished with its result (not runner_lost), from the one run it had.
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"n": 42}}]
    assert len(sandbox.runs) == 1
    assert lost[0] == document["audit"]["taskId"]  # the frame lost was this task's
