"""Several runners, a broker that goes away, tenants: over real sockets and real containers."""

from __future__ import annotations

import asyncio
import collections
import re
import socket

import httpx
import pytest

from runner.broker_server.core import Broker

from .harness import (
    RunnerProcess,
    completions,
    finished,
    start_broker,
    submit,
    until,
)

pytestmark = pytest.mark.usefixtures("task_image")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_two_runners_share_twenty_tasks_none_twice_none_lost() -> None:
    async with start_broker() as running:
        core = running.broker
        core.log_messages = True
        env = {"N8N_RUNNERS_MAX_CONCURRENCY": "2"}
        first, second = RunnerProcess(running.url, env), RunnerProcess(running.url, env)
        try:
            await first.wait_connected(core)
            await second.wait_connected(core)
            tasks = [submit(core, f"return {n} * 2") for n in range(20)]
            documents = await asyncio.gather(*(finished(t, 90) for t in tasks))
        finally:
            await first.aclose()
            await second.aclose()
    assert [d["result"] for d in documents] == [n * 2 for n in range(20)]
    for task in tasks:
        assert len(completions(core, task.task_id)) == 1, task.task_id
    ran_on = collections.Counter(
        rid for rid, m in core.message_log if m["type"] == "runner:taskdone"
    )
    assert set(ran_on) == {first.runner_id, second.runner_id}
    assert sum(ran_on.values()) == 20


async def test_runner_reconnects_to_a_restarted_broker_and_reports_an_outage_task_once() -> None:
    port = free_port()
    # The first broker gives running tasks no time on shutdown, so the long task is
    # still running in its container when the broker goes away.
    async with start_broker(broker_port=port, graceful_shutdown_timeout_s=0.1) as first:
        first.broker.log_messages = True
        runner = RunnerProcess(first.url, {"N8N_RUNNERS_TASK_TIMEOUT": "30"})
        try:
            await runner.wait_connected(first.broker)
            outage_task = submit(first.broker, "import time\ntime.sleep(5)\nreturn 'survived'")
            await until(lambda: outage_task.status == "running", 15, "the long task to start")
        except BaseException:
            await runner.aclose()
            raise
    try:
        async with start_broker(broker_port=port) as second:
            second.broker.log_messages = True
            await runner.wait_connected(second.broker, timeout_s=30)
            # The runner is back well before the 5 s task ends, so the completion
            # is delivered exactly once, over the new connection (the new broker does
            # not know the task and drops it, but it saw it on the wire).
            await until(
                lambda: completions(second.broker, outage_task.task_id),
                30,
                "the outage task's completion",
            )
            next_task = submit(second.broker, "return 'next'")
            assert (await finished(next_task))["result"] == "next"
            reported = completions(second.broker, outage_task.task_id)
            assert len(reported) == 1
            assert reported[0]["data"] == {"result": "survived"}
            assert "undeliverable" not in runner.output
            assert "Authentication failed" not in runner.output
            fetched = re.findall(r"Connected to broker", runner.output)
            assert len(fetched) >= 2  # a fresh grant token for the second connection
    finally:
        assert await runner.aclose() == 0, runner.output


async def test_a_busy_tenant_does_not_starve_another() -> None:
    async with start_broker(api_keys="key-a=a,key-b=b", tenant_quotas="a=1") as running:
        runner = RunnerProcess(running.url, {"N8N_RUNNERS_MAX_CONCURRENCY": "2"})
        try:
            await runner.wait_connected(running.broker)
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                a = {"Authorization": "Bearer key-a"}
                b = {"Authorization": "Bearer key-b"}
                a_ids = []
                for n in range(10):
                    response = await http.post(
                        "/v1/tasks",
                        json={"code": f"import time\ntime.sleep(0.3)\nreturn {n}"},
                        headers=a,
                    )
                    assert response.status_code == 202
                    a_ids.append(response.json()["taskId"])
                b_response = await http.post(
                    "/v1/tasks?wait=60", json={"code": "return 'b'"}, headers=b
                )
                assert b_response.status_code == 200, b_response.text
                assert b_response.json()["result"] == "b"
                states = [(await http.get(f"/v1/tasks/{i}", headers=a)).json() for i in a_ids]
                assert sum(s.get("status") == "success" for s in states) < 10, (
                    "B waited for A's backlog"
                )

                assert (await http.get(f"/v1/tasks/{a_ids[0]}", headers=b)).status_code == 404
                assert (await http.get("/v1/tasks")).status_code == 401
                assert (
                    await http.get("/v1/tasks", headers={"Authorization": "Bearer x"})
                ).status_code == 401
                last = await http.get(f"/v1/tasks/{a_ids[-1]}?wait=60", headers=a)
                assert last.json()["result"] == 9
                assert (
                    await http.post("/v1/tasks", content=b"x" * (17 * 1024 * 1024), headers=a)
                ).status_code == 413
                assert (
                    await http.post("/v1/tasks", json={"code": 1}, headers=a)
                ).status_code == 422
                after = await http.post(
                    "/v1/tasks?wait=30", json={"code": "return 'ok'"}, headers=a
                )
                assert after.json()["result"] == "ok"
        finally:
            await runner.aclose()


async def _outage(
    port: int, env: dict[str, str], sleeps_s: list[float], outage_s: float
) -> tuple[RunnerProcess, list[str], Broker, Broker, str]:
    """Tasks sleeping ``sleeps_s`` start on one broker, which then goes away for
    ``outage_s``; a new broker on the same port takes the runner back. Returns once
    every task's fate is known: its completion on the new broker's wire, or the
    runner's log line saying it was undeliverable. The last value is the runner's
    log as it was just before the new broker started."""
    async with start_broker(broker_port=port, graceful_shutdown_timeout_s=0.1) as first:
        first.broker.log_messages = True
        runner = RunnerProcess(first.url, env)
        try:
            await runner.wait_connected(first.broker)
            tasks = [
                submit(first.broker, f"import time\ntime.sleep({s})\nreturn {n}")
                for n, s in enumerate(sleeps_s)
            ]
            await until(lambda: all(t.status == "running" for t in tasks), 20, "all running")
        except BaseException:
            await runner.aclose()
            raise
    task_ids = [t.task_id for t in tasks]
    try:
        await asyncio.sleep(outage_s)
        offline_log = runner.output
        async with start_broker(broker_port=port) as second:
            second.broker.log_messages = True
            await runner.wait_connected(second.broker, timeout_s=30)

            def settled() -> bool:
                return all(
                    completions(second.broker, i)
                    or f"task {i} result is undeliverable" in runner.output
                    for i in task_ids
                )

            await until(settled, 30, "every task delivered or logged as undeliverable")
            # A little longer, so that a second report of anything would be seen too.
            nxt = submit(second.broker, "return 'next'")
            assert (await finished(nxt))["result"] == "next"
            return runner, task_ids, first.broker, second.broker, offline_log
    except BaseException:
        await runner.aclose()
        raise


async def test_concurrent_tasks_across_a_broker_outage_are_each_reported_exactly_once() -> None:
    # Two tasks end while the broker is away (held, sent after reconnecting), two end
    # after the runner is back (sent over the new connection).
    env = {"N8N_RUNNERS_MAX_CONCURRENCY": "4", "N8N_RUNNERS_TASK_TIMEOUT": "30"}
    runner, task_ids, first, second, _ = await _outage(free_port(), env, [1, 1, 6, 6], 2.5)
    try:
        for n, task_id in enumerate(task_ids):
            assert completions(first, task_id) == []
            reported = completions(second, task_id)
            assert len(reported) == 1, (task_id, reported)
            assert reported[0]["type"] == "runner:taskdone"
            assert reported[0]["data"] == {"result": n}
        held = re.findall(r"completion of task (\S+) held until the broker is back", runner.output)
        assert sorted(held) == sorted(task_ids[:2])
        assert "undeliverable" not in runner.output
    finally:
        assert await runner.aclose() == 0, runner.output


async def test_tasks_that_end_during_a_long_broker_outage_are_logged_undeliverable_never_sent() -> (
    None
):
    # Results wait 1 s for the broker; it stays away 4 s. The two short tasks end in
    # the outage and are logged as undeliverable while it lasts; the two long ones
    # end after the runner is back and are delivered once.
    env = {
        "N8N_RUNNERS_MAX_CONCURRENCY": "4",
        "N8N_RUNNERS_TASK_TIMEOUT": "30",
        "SANDBOX_UNDELIVERED_TTL_S": "1",
    }
    outage = await _outage(free_port(), env, [0.5, 0.5, 8, 8], 4)
    runner, task_ids, first, second, offline_log = outage
    try:
        for task_id in task_ids[:2]:
            assert completions(first, task_id) == []
            assert completions(second, task_id) == []
            assert runner.output.count(f"task {task_id} result is undeliverable") == 1
            # Said during the outage, not only once the broker was back.
            assert f"task {task_id} result is undeliverable" in offline_log
        for n, task_id in enumerate(task_ids[2:], start=2):
            reported = completions(second, task_id)
            assert [m["data"] for m in reported] == [{"result": n}]
    finally:
        assert await runner.aclose() == 0, runner.output
