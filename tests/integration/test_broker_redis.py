"""Two brokers on one Redis, two runners, 200 tasks: a broker and a runner SIGKILLed.

Real processes throughout, configured by environment as an operator would: a
redis-server of the test's own, two ``sandbox-runner broker`` processes on it
(``SANDBOX_BROKER_STORE=redis://...``), two ``sandbox-runner serve`` runners, each given
both brokers (``N8N_RUNNERS_TASK_BROKER_URI=A,B`` and ``B,A``), real containers. 200
tasks are submitted across both brokers' APIs, half of them with a retry policy;
broker A is SIGKILLed mid-run (its runner goes over to B; A's tasks are reclaimed by
B once A's lease lapses), then runner 2 is SIGKILLed while it runs tasks.

Issue 13's acceptance: every task ends with exactly one result, readable from the
surviving broker: each success carries its own task's value; those that ran on the
killed runner succeed on a second attempt with a policy, end ``runner_lost`` without
one; nothing else fails.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from helpers import until

from runner.testing import BrokerProcess, RedisServer

from .harness import AUTH_TOKEN, RunnerProcess

pytestmark = pytest.mark.usefixtures("task_image")

TASKS = 200
CODE = "import time\ntime.sleep({s})\nreturn {n}"
SLOW_EVERY = 5  # every fifth task sleeps 4 s: runner 2 is killed in the middle of some
RETRY = {"maxAttempts": 2, "initialDelayS": 0.2}


def broker_env(redis_url: str) -> dict[str, str]:
    return {
        "N8N_RUNNERS_AUTH_TOKEN": AUTH_TOKEN,
        "SANDBOX_BROKER_STORE": redis_url,
        "SANDBOX_BROKER_LEASE_S": "2",
        "SANDBOX_RUNNER_LOST_GRACE_S": "2",
    }


async def eventually(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def listing(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/v1/tasks", params={"limit": 1000})
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()["tasks"]
    return tasks


async def test_two_brokers_two_runners_a_broker_and_a_runner_killed_every_task_once(
    redis_server: RedisServer, redis_url: str
) -> None:
    env = broker_env(redis_url)
    a, b = BrokerProcess(env), BrokerProcess(env)
    owners = [f"pytest-redis-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    runner_env = {"N8N_RUNNERS_MAX_CONCURRENCY": "3", "N8N_RUNNERS_TASK_TIMEOUT": "20"}
    r1 = RunnerProcess(f"{a.url},{b.url}", {**runner_env, "SANDBOX_RUNNER_ID": owners[0]})
    r2 = RunnerProcess(f"{b.url},{a.url}", {**runner_env, "SANDBOX_RUNNER_ID": owners[1]})
    processes: list[Any] = [r1, r2, a, b]
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=90) as at_a,
            httpx.AsyncClient(base_url=b.url, timeout=90) as at_b,
        ):
            for http in (at_a, at_b):

                async def registered(http: httpx.AsyncClient = http) -> bool:
                    return bool((await http.get("/v1/health")).json()["runners"])

                await eventually(registered, 90, "a runner on each broker")
            # 200 tasks, alternately to A and B, every other pair with a retry policy.
            ids: dict[str, int] = {}
            with_retry: set[str] = set()
            slow_ids: set[str] = set()
            for n in range(TASKS):
                slow = n % SLOW_EVERY == 0
                body: dict[str, Any] = {"code": CODE.format(n=n, s=4 if slow else 0.3)}
                if n % 4 < 2:
                    body["retry"] = RETRY
                response = await (at_a if n % 2 == 0 else at_b).post("/v1/tasks", json=body)
                assert response.status_code == 202, response.text
                task_id = response.json()["taskId"]
                ids[task_id] = n
                if slow:
                    slow_ids.add(task_id)
                if "retry" in body:
                    with_retry.add(task_id)

            async def some_finished() -> bool:
                tasks = await listing(at_b)
                return sum(t["status"] == "success" for t in tasks) >= 30

            await eventually(some_finished, 120, "30 tasks to finish")
            a.kill()  # mid-run: its runner goes over to B, its tasks are reclaimed

            async def r2_busy() -> list[dict[str, Any]]:
                tasks = await listing(at_b)
                mine = [t for t in tasks if t["status"] == "running" and t["runnerId"] == r2_id]
                kinds = {t["taskId"] in with_retry for t in mine if t["taskId"] in slow_ids}
                return mine if kinds == {True, False} else []

            r2_id = await until(r2._announced_id, 10, "runner 2's id")
            on_r2 = await eventually(r2_busy, 120, "runner 2 running tasks of both kinds")
            r2.process.kill()
            r2.process.wait()
            killed_running = {t["taskId"] for t in on_r2}

            documents: dict[str, dict[str, Any]] = {}
            for task_id in ids:
                response = await at_b.get(f"/v1/tasks/{task_id}", params={"wait": 120})
                assert response.status_code == 200, (task_id, response.text)
                documents[task_id] = response.json()
            health = await at_b.get("/v1/health")
            metrics_text = (await at_b.get("/metrics")).text
    finally:
        for process in processes:
            process.stop()  # (a killed one too: its output pipe is closed)
        # The killed runner's leftovers: a runner under its owner id sweeps them as it
        # starts (before it announces itself).
        sweeper = RunnerProcess(b.url, {"SANDBOX_RUNNER_ID": owners[1]})
        try:
            await until(
                lambda: sweeper._announced_id() or sweeper.process.poll() is not None,
                90,
                "the sweeping runner to start",
            )
        finally:
            sweeper.stop()

    assert health.status_code == 200
    failed = {i: d for i, d in documents.items() if d["status"] != "success"}
    for task_id, document in documents.items():
        if document["status"] == "success":
            assert document["result"] == ids[task_id], (task_id, document)
    # Only runner_lost, only on tasks without a policy, only what runner 2 was running.
    assert {d["error"]["code"] for d in failed.values()} <= {"runner_lost"}, failed
    assert not set(failed) & with_retry, failed
    assert set(failed) <= killed_running, failed
    # A second attempt only after runner_lost, only for what runner 2 was running (a
    # broker's death is recovery, not a retry: it makes no attempt of the policy's).
    retried = {i: d for i, d in documents.items() if d.get("attempts")}
    assert set(retried) <= killed_running & with_retry, retried
    for document in retried.values():
        assert document["status"] == "success", document
        assert [e["error"]["code"] for e in document["attempts"]] == ["runner_lost"]
    # Runner 2 was killed in the middle of slow tasks of both kinds: both outcomes seen.
    assert killed_running & slow_ids & with_retry & set(retried), (killed_running, retried)
    assert killed_running & slow_ids & set(failed), (killed_running, failed)
    assert "sandbox_broker_tasks_total" in metrics_text
