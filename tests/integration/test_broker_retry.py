"""A task's retry policy through the real broker: a runner SIGKILLed mid-task.

The broker (web layer and core) runs in the test's loop, the runners are real
``sandbox-runner serve`` processes with real containers. Two tasks run on a runner
that is killed with SIGKILL: the one submitted with ``retry`` runs again on the next
runner, as attempt 2 (``<taskId>.2`` on the wire), and succeeds, its document naming
attempt 1's ``runner_lost``; the one without ends ``runner_lost``, as always.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import replace

import docker
import httpx
import pytest
from helpers import remains, until

from runner.sandbox.labels import LABEL_OWNER

from .harness import RunnerProcess, completions, finished, start_broker

pytestmark = pytest.mark.usefixtures("task_image")

SLOW = "import time\ntime.sleep(3)\nreturn {tag!r}"


async def test_a_task_whose_runner_was_killed_runs_again_with_its_policy_and_succeeds(
    docker_client: docker.DockerClient,
) -> None:
    owner = f"pytest-retry-{uuid.uuid4().hex[:8]}"
    # Both runners under one owner id: the second sweeps the killed one's containers.
    env = {
        "SANDBOX_RUNNER_ID": owner,
        "N8N_RUNNERS_MAX_CONCURRENCY": "2",
        "N8N_RUNNERS_TASK_TIMEOUT": "30",
    }
    async with start_broker() as running:
        core = running.broker
        core.log_messages = True
        # The killed runner never comes back under its id: say so after 1 s, not 30.
        core.config = replace(core.config, runner_lost_grace_s=1.0)
        first = RunnerProcess(running.url, env)
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            try:
                await first.wait_connected(core)
                retried = await http.post(
                    "/v1/tasks",
                    json={
                        "code": SLOW.format(tag="retried"),
                        "retry": {"maxAttempts": 2, "initialDelayS": 0.5},
                    },
                )
                plain = await http.post("/v1/tasks", json={"code": SLOW.format(tag="plain")})
                assert (retried.status_code, plain.status_code) == (202, 202), retried.text
                tasks = [core.get(r.json()["taskId"]) for r in (retried, plain)]
                assert all(tasks)
                await until(
                    lambda: all(t.status == "running" for t in tasks if t), 30, "both to start"
                )
                first.process.send_signal(signal.SIGKILL)
                assert await asyncio.to_thread(first.process.wait, 10) == -signal.SIGKILL
            finally:
                first.stop()
            lost = await http.get(f"{plain.headers['location']}?wait=30")
            assert lost.json()["error"]["code"] == "runner_lost"

            second = RunnerProcess(running.url, env)
            try:
                await second.wait_connected(core)
                done = await http.get(f"{retried.headers['location']}?wait=60")
            finally:
                assert await second.aclose() == 0, second.output
        document = done.json()
        assert (document["status"], document["result"]) == ("success", "retried"), document
        assert [(a["attempt"], a["error"]["code"]) for a in document["attempts"]] == [
            (1, "runner_lost")
        ]
        task_id = retried.json()["taskId"]
        assert completions(core, task_id) == []  # the killed runner said nothing
        (completion,) = completions(core, f"{task_id}.2")
        assert completion["type"] == "runner:taskdone"
        task = core.get(task_id)
        assert task is not None
        assert (await finished(task))["result"] == "retried"
    assert remains(docker_client, labels={LABEL_OWNER: owner}) == []
