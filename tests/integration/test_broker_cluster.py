"""Several runners, a broker that goes away, tenants: over real sockets and real containers.

The runners run on this host's default engine (``SANDBOX_BACKEND=auto``), once: what
is under test is the broker and the protocol between processes, which no engine
changes (``serve`` on each engine: test_broker_e2e.py); the outages hold 20 s tasks,
so a second engine would add about a minute and prove nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
from collections.abc import Callable

import httpx
import pytest
from helpers import free_port, until

from runner.broker_server.core import Broker

from .harness import (
    RunnerProcess,
    completions,
    finished,
    start_broker,
    submit,
)

pytestmark = pytest.mark.usefixtures("task_image")

A_TASKS = 6  # the busy tenant's backlog in the starvation test


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
    failed = [d for d in documents if "result" not in d]
    assert not failed, failed
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
    # Tenant A may have 1 task on a runner at a time, and queues 6 that sleep 1 s each;
    # the runner takes 2. B's task, submitted behind all of A's, takes the free slot
    # at once, long before A's third task can start. A first-in-first-out queue would
    # accept B only after A's last task (whether A's quota held up its head or not).
    async with start_broker(api_keys="key-a=a,key-b=b", tenant_quotas="a=1") as running:
        core = running.broker
        core.log_messages = True
        runner = RunnerProcess(running.url, {"N8N_RUNNERS_MAX_CONCURRENCY": "2"})
        try:
            await runner.wait_connected(core)
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                a = {"Authorization": "Bearer key-a"}
                b = {"Authorization": "Bearer key-b"}
                a_ids = []
                for n in range(A_TASKS):
                    response = await http.post(
                        "/v1/tasks",
                        json={"code": f"import time\ntime.sleep(1)\nreturn {n}"},
                        headers=a,
                    )
                    assert response.status_code == 202
                    a_ids.append(response.json()["taskId"])
                b_response = await http.post(
                    "/v1/tasks?wait=60", json={"code": "return 'b'"}, headers=b
                )
                assert b_response.status_code == 200, b_response.text
                assert b_response.json()["result"] == "b"
                b_tasks = (await http.get("/v1/tasks", headers=b)).json()["tasks"]
                assert len(b_tasks) == 1
                b_id = b_tasks[0]["taskId"]

                assert (await http.get(f"/v1/tasks/{a_ids[0]}", headers=b)).status_code == 404
                assert (await http.get("/v1/tasks")).status_code == 401
                assert (
                    await http.get("/v1/tasks", headers={"Authorization": "Bearer x"})
                ).status_code == 401
                last = await http.get(f"/v1/tasks/{a_ids[-1]}?wait=60", headers=a)
                assert last.json()["result"] == A_TASKS - 1
                # The order the runner accepted the tasks in, from its own messages.
                accepted = [
                    m["taskId"] for _, m in core.message_log if m["type"] == "runner:taskaccepted"
                ]
                assert sorted(accepted) == sorted([*a_ids, b_id])  # each once
                assert [i for i in accepted if i != b_id] == a_ids
                assert accepted.index(b_id) < accepted.index(a_ids[2]), accepted
                # A's quota of 1: each of A's tasks was accepted only after the runner
                # reported the previous one done.
                events = [
                    (m["type"], m["taskId"])
                    for _, m in core.message_log
                    if m.get("taskId") in a_ids
                ]
                for previous, task_id in itertools.pairwise(a_ids):
                    done_at = events.index(("runner:taskdone", previous))
                    assert events.index(("runner:taskaccepted", task_id)) > done_at, events
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
    port: int,
    env: dict[str, str],
    sleeps_s: list[float],
    outage_over: Callable[[str, list[str]], bool],
    what: str,
) -> tuple[RunnerProcess, list[str], Broker, Broker, str]:
    """Tasks sleeping ``sleeps_s`` start on one broker, which then goes away until
    ``outage_over(runner output, task ids)`` holds (polled, at most 60 s); a new broker
    on the same port takes the runner back. Returns once every task's fate is known:
    its completion on the new broker's wire, or the runner's log line saying it was
    undeliverable. The last value is the runner's log as it was just before the new
    broker started."""
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
        await until(
            lambda: outage_over(runner.output, task_ids) or runner.process.poll() is not None,
            60,
            what,
        )
        assert runner.process.poll() is None, runner.output
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

            await until(settled, 60, "every task delivered or logged as undeliverable")
            # A little longer, so that a second report of anything would be seen too.
            nxt = submit(second.broker, "return 'next'")
            assert (await finished(nxt))["result"] == "next"
            return runner, task_ids, first.broker, second.broker, offline_log
    except BaseException:
        await runner.aclose()
        raise


def held(output: str) -> list[str]:
    """The tasks whose completion the runner held for the broker to come back."""
    return re.findall(r"completion of task (\S+) held until the broker is back", output)


def undeliverable(output: str, task_ids: list[str]) -> list[str]:
    return [i for i in task_ids if f"task {i} result is undeliverable" in output]


# The short tasks end while the broker is away (the outage lasts until the runner said
# so); the long ones run well past the runner's reconnection, even on a loaded machine.
SHORT_S, LONG_S = 2, 20


async def test_concurrent_tasks_across_a_broker_outage_are_each_reported_exactly_once() -> None:
    # Two tasks end while the broker is away (held, sent after reconnecting), two end
    # after the runner is back (sent over the new connection).
    env = {"N8N_RUNNERS_MAX_CONCURRENCY": "4", "N8N_RUNNERS_TASK_TIMEOUT": "60"}
    runner, task_ids, first, second, offline_log = await _outage(
        free_port(),
        env,
        [SHORT_S, SHORT_S, LONG_S, LONG_S],
        lambda output, ids: set(held(output)) >= set(ids[:2]),
        "the runner to hold both short tasks' completions",
    )
    try:
        for n, task_id in enumerate(task_ids):
            assert completions(first, task_id) == []
            reported = completions(second, task_id)
            assert len(reported) == 1, (task_id, reported)
            assert reported[0]["type"] == "runner:taskdone"
            assert reported[0]["data"] == {"result": n}
        assert sorted(held(offline_log)) == sorted(task_ids[:2])
        # Nothing of these attempts held again after the reconnect. (The new broker took
        # over the first one's store, so it runs each task again as attempt 2, "<id>.2";
        # one of those may be held when that broker stops at the end of the test, which
        # is what a runner must do with a completion no broker has acknowledged.)
        first_attempts = [i for i in held(runner.output) if i in task_ids]
        assert sorted(first_attempts) == sorted(task_ids[:2])
        assert "undeliverable" not in runner.output
    finally:
        assert await runner.aclose() == 0, runner.output


async def test_tasks_that_end_during_a_long_broker_outage_are_logged_undeliverable_never_sent() -> (
    None
):
    # Results wait 1 s for the broker; it stays away until the runner logged both
    # short tasks as undeliverable. The two long ones end after the runner is back
    # and are delivered once.
    env = {
        "N8N_RUNNERS_MAX_CONCURRENCY": "4",
        "N8N_RUNNERS_TASK_TIMEOUT": "60",
        "SANDBOX_UNDELIVERED_TTL_S": "1",
    }
    outage = await _outage(
        free_port(),
        env,
        [SHORT_S, SHORT_S, LONG_S, LONG_S],
        lambda output, ids: undeliverable(output, ids) == ids[:2],
        "the runner to log both short tasks as undeliverable",
    )
    runner, task_ids, first, second, offline_log = outage
    try:
        # Said during the outage (the new broker started only after), for the short
        # tasks only.
        assert undeliverable(offline_log, task_ids) == task_ids[:2]
        for task_id in task_ids[:2]:
            assert completions(first, task_id) == []
            assert completions(second, task_id) == []
            assert runner.output.count(f"task {task_id} result is undeliverable") == 1
        for n, task_id in enumerate(task_ids[2:], start=2):
            reported = completions(second, task_id)
            assert [m["data"] for m in reported] == [{"result": n}]
        assert undeliverable(runner.output, task_ids) == task_ids[:2]
    finally:
        assert await runner.aclose() == 0, runner.output
