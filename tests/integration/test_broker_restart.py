"""A broker on a SQLite store, killed with SIGKILL and started again: nothing is lost.

The real ``sandbox-runner broker`` process (configured by environment only, as an
operator would) and real ``sandbox-runner serve`` runners with real containers. The
broker is killed with SIGKILL: no drain, nothing flushed; its successor on the same
file must still have the queued tasks (run by a runner that connects afterwards),
the results, the idempotency keys, and must run again, at the next attempt, a task
that was running when the broker died, dropping the old attempt's late result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, sample

from runner.testing import BrokerProcess

from .harness import AUTH_TOKEN, RunnerProcess

pytestmark = pytest.mark.usefixtures("task_image")

QUEUED = 50  # issue 13: 50 tasks submitted, the broker SIGKILLed before any runner connects


def broker_env(store: Path) -> dict[str, str]:
    return {"N8N_RUNNERS_AUTH_TOKEN": AUTH_TOKEN, "SANDBOX_BROKER_STORE": f"sqlite:///{store}"}


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    """:func:`helpers.until` for a check that asks a process over HTTP."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def wait_for_a_runner(http: httpx.AsyncClient, runner: RunnerProcess) -> None:
    async def registered() -> bool:
        response = await http.get("/v1/health")
        return bool(response.json()["runners"]) or runner.process.poll() is not None

    await eventually(registered, 30, "a runner to register with the broker")
    assert runner.process.poll() is None, runner.output


def metric(text: str, name: str, **labels: str) -> float:
    """A sample of the broker's /metrics; an absent one (never counted) is 0."""
    return sample(text, name, **labels) or 0.0


async def test_a_broker_killed_with_sigkill_keeps_its_queue_results_and_keys(
    tmp_path: Path,
) -> None:
    store = tmp_path / "state" / "broker-tasks.sqlite3"
    first = BrokerProcess(broker_env(store))
    try:
        first.wait_for_line(f"task store: {store}", 10)
        async with httpx.AsyncClient(base_url=first.url, timeout=90) as http:
            runner = RunnerProcess(first.url)
            try:
                await wait_for_a_runner(http, runner)
                done = await http.post("/v1/tasks?wait=60", json={"code": "return 'before'"})
                assert done.status_code == 200, done.text
            finally:
                assert await runner.aclose() == 0, runner.output
            # No runner now: these wait in the queue when the broker dies.
            queued = [
                await http.post("/v1/tasks", json={"code": f"return {n} * 2"})
                for n in range(QUEUED - 1)
            ]
            keyed = await http.post(
                "/v1/tasks", json={"code": "return 'keyed'"}, headers={"Idempotency-Key": "k-1"}
            )
        assert [r.status_code for r in [*queued, keyed]] == [202] * QUEUED
    finally:
        assert first.kill() == -9, first.output

    second = BrokerProcess(broker_env(store))
    try:
        async with httpx.AsyncClient(base_url=second.url, timeout=90) as http:
            read = await http.get(done.headers["location"])
            assert (read.status_code, read.content) == (200, done.content)
            for response in [*queued, keyed]:
                state = await http.get(response.headers["location"])
                assert (state.status_code, state.json()["status"]) == (202, "queued")
            retry = await http.post(
                "/v1/tasks", json={"code": "return 'keyed'"}, headers={"Idempotency-Key": "k-1"}
            )
            assert retry.json()["taskId"] == keyed.json()["taskId"]
            assert retry.headers["idempotent-replayed"] == "true"
            runner = RunnerProcess(second.url)
            try:
                await wait_for_a_runner(http, runner)
                results: list[Any] = []
                for response in [*queued, keyed]:
                    ended = await http.get(f"{response.headers['location']}?wait=60")
                    assert ended.status_code == 200, ended.text
                    results.append(ended.json()["result"])
            finally:
                assert await runner.aclose() == 0, runner.output
            metrics = (await http.get("/metrics")).text
        assert results == [n * 2 for n in range(QUEUED - 1)] + ["keyed"]
        # Each ran once: QUEUED finished on this broker, none requeued by the restart,
        # no result of another attempt seen.
        assert (
            metric(metrics, "sandbox_broker_tasks_total", status="success", error_code="") == QUEUED
        )
        assert metric(metrics, "sandbox_broker_stale_results_total") == 0
        assert metric(metrics, "sandbox_broker_requeues_total", cause="broker_restart") == 0
    finally:
        assert second.stop() == 0, second.output


async def test_a_task_running_when_the_broker_is_killed_runs_again_and_the_old_result_is_dropped(
    tmp_path: Path,
) -> None:
    store = tmp_path / "broker-tasks.sqlite3"
    port = free_port()  # the runner finds the second broker where the first one was
    first = BrokerProcess(broker_env(store), port=port)
    runner: RunnerProcess | None = None
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            runner = RunnerProcess(first.url, {"N8N_RUNNERS_TASK_TIMEOUT": "30"})
            await wait_for_a_runner(http, runner)
            submitted = await http.post(
                "/v1/tasks", json={"code": "import time\ntime.sleep(4)\nreturn 'slept'"}
            )
            location = submitted.headers["location"]

            async def running() -> bool:
                return bool((await http.get(location)).json().get("status") == "running")

            await eventually(running, 30, "the task to start on the runner")
        first.kill()

        second = BrokerProcess(broker_env(store), port=port)
        try:
            async with httpx.AsyncClient(base_url=second.url, timeout=90) as http:
                ended = await http.get(f"{location}?wait=60")
                assert ended.status_code == 200, ended.text
                assert ended.json()["result"] == "slept"

                async def stale() -> float:
                    text = (await http.get("/metrics")).text
                    return metric(text, "sandbox_broker_stale_results_total")

                # Attempt 1 kept running on the runner through the outage; its result,
                # sent over the new connection, names attempt 1: dropped and counted.
                await eventually(stale, 60, "attempt 1's late result")
                metrics = (await http.get("/metrics")).text
            assert metric(metrics, "sandbox_broker_stale_results_total") == 1, runner.output
            assert metric(metrics, "sandbox_broker_requeues_total", cause="broker_restart") == 1
            assert (
                metric(metrics, "sandbox_broker_tasks_total", status="success", error_code="") == 1
            )
        finally:
            assert second.stop() == 0, second.output
    finally:
        first.kill()
        if runner is not None:
            assert await runner.aclose() == 0, runner.output
