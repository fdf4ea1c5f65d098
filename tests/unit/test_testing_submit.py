"""runner.testing's submit_task against an in-process broker (loopback, no Docker).

With no runner it fails within its grace, cancels the task and says how to add a
runner; a runner that is connected but busy is waited for, however long.
"""

from __future__ import annotations

import asyncio

import pytest
from fakes import connect
from helpers import until

from runner.broker_server.server import running_broker
from runner.protocol.messages import (
    TaskAccepted,
    TaskDone,
    TaskDoneData,
    TaskOffer,
    TaskOfferAccept,
)
from runner.settings import Settings
from runner.testing import SandboxServiceError, submit_task

SETTINGS = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1)


async def test_no_runner_fails_within_the_grace_cancels_and_says_how_to_add_one() -> None:
    async with running_broker(SETTINGS, auth_token="secret-auth-token") as running:
        with pytest.raises(SandboxServiceError) as raised:
            await asyncio.to_thread(
                submit_task, running.url, None, "return 1", timeout_s=120, no_runner_grace_s=0.5
            )
        message = str(raised.value)
        assert message.startswith(f"No runner is connected to this broker ({running.url}): ")
        assert "and was cancelled. Add one: SandboxRunnerContainer(broker)" in message
        assert "`sandbox-runner serve` with N8N_RUNNERS_TASK_BROKER_URI" in message
        (task,) = running.broker.recent("default", 10)
        assert task.document is not None
        assert task.document["error"]["code"] == "cancelled"


async def test_a_busy_runner_is_waited_for_past_the_grace() -> None:
    async with running_broker(SETTINGS, auth_token="secret-auth-token") as running:
        broker = running.broker
        runner = connect(broker)  # registered, no free slot
        call = asyncio.create_task(
            asyncio.to_thread(
                submit_task, running.url, None, "return [1]", timeout_s=120, no_runner_grace_s=0.5
            )
        )
        await until(lambda: broker.recent("default", 1))
        await asyncio.sleep(1.5)  # well past the grace, with the task still queued
        assert not call.done()
        broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
        (accept,) = runner.of(TaskOfferAccept)
        broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
        broker.runner_message(
            runner, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=[1]))
        )
        document = await asyncio.wait_for(call, timeout=60)  # hang guard only
    assert document["status"] == "success"
    assert document["result"] == [1]
