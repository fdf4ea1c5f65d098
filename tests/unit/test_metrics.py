"""Prometheus metrics: exact counts after a few tasks, on the runner and on the broker;
and the task id on every log line written about a task.

The runner service and the embedded broker run for real in this event loop (the
WebSocket protocol, the health-check server, the HTTP API); only the sandbox is a
stub, so the numbers are known exactly. tests/integration/test_runner_image.py does
the same against the runner image with real task containers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fakes import FakeClock, FakeRunner, advance
from helpers import sample

from runner.analyzer import Analyzer, ImportPolicy
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.server import RunningBroker, running_broker
from runner.broker_server.submission import Submission
from runner.errors import DockerUnavailableError
from runner.metrics import BrokerMetrics, CollectorRegistry, RunnerMetrics, exposition
from runner.pipeline import AuditContext, TaskPipeline
from runner.protocol.messages import RunnerInfo, TaskAccepted, TaskOffer, TaskRejected
from runner.sandbox.base import (
    ExecutionResult,
    GuardConfig,
    Limits,
    Mode,
    Outcome,
    TaskError,
    TaskSpec,
)
from runner.service import RunnerService
from runner.settings import Settings

AUTH = "metrics-test-token-0123456789"


class StubSandbox:
    """Known durations: a warm success (with one set-up retry), a cold user error."""

    def __init__(self, on_retry: Any = None) -> None:
        self.on_retry = on_retry

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        if "daemon-gone" in spec.code:
            raise DockerUnavailableError("The Docker daemon went away", hint="restart it")
        if "our-bug" in spec.code:
            raise ValueError("a bug of ours, not a limit")
        if "boom" in spec.code:
            return ExecutionResult(
                outcome=Outcome.USER_ERROR,
                error=TaskError(Outcome.USER_ERROR, "boom"),
                container_id="c-cold",
                durations_ms={"create": 100.0, "attach": 50.0, "start": 150.0, "run": 500.0},
                details={"containerStart": "cold"},
            )
        if self.on_retry is not None:
            self.on_retry("conflict")
        return ExecutionResult(
            outcome=Outcome.SUCCESS,
            result=[{"json": {"ok": True}}],
            container_id="c-warm",
            durations_ms={"poolWait": 2.0, "run": 20.0},
            details={"containerStart": "warm"},
        )

    async def cancel(self, task_id: str) -> bool:
        return False  # every task ends at once

    async def aclose(self) -> None:
        pass


def stub_pipeline(sandbox: StubSandbox | None = None) -> TaskPipeline:
    return TaskPipeline(
        sandbox=sandbox or StubSandbox(),
        analyzer=Analyzer(ImportPolicy.from_env_strings("json", "")),
        guards=GuardConfig(stdlib_allow=("json",), external_allow=(), builtins_deny=()),
        limits=Limits(),
        context=AuditContext(
            runner_id="metrics-unit",
            image="sandbox-runner-task:test",
            image_id=None,
            isolation={"seccomp": {"sha256": "feed"}},
            policy_sha256="abc123",
        ),
    )


@asynccontextmanager
async def service_and_broker() -> AsyncIterator[tuple[RunnerService, RunningBroker]]:
    settings = Settings(
        broker_host="127.0.0.1",
        broker_port=0,
        auth_token=AUTH,
        health_check_server_enabled=True,
        health_check_server_port=0,
        max_concurrency=1,
        graceful_shutdown_timeout_s=2,
        runner_id="metrics-unit",
    )
    async with running_broker(settings, auth_token=AUTH) as running:
        # As `serve` does: the sandbox is told of its retries by its constructor.
        metrics = RunnerMetrics(CollectorRegistry())
        service = RunnerService(
            settings,
            stub_pipeline(StubSandbox(on_retry=metrics.retry)),
            broker_uri=running.url,
            handle_signals=False,
            metrics=metrics,
        )
        serving = asyncio.create_task(service.run())
        try:
            for _ in range(200):
                if running.broker.runner_ids():
                    break
                await asyncio.sleep(0.02)
            assert running.broker.runner_ids()
            yield service, running
        finally:
            service.request_shutdown("test over")
            assert await asyncio.wait_for(serving, 10) == 0


async def finished(running: RunningBroker, code: str) -> dict[str, Any]:
    task = running.broker.submit(Submission(tenant="t", code=code, items=[], mode=Mode.ALL_ITEMS))
    await running.driver.wait_finished(task, 10)
    assert task.document is not None
    return task.document


async def test_runner_and_broker_metrics_count_exactly_what_ran() -> None:
    async with service_and_broker() as (service, running):
        documents = [
            await finished(running, "return [{'json': {'ok': True}}]"),
            await finished(running, "return [{'json': {'ok': True}}]"),
            await finished(running, "raise ValueError('boom')"),
            await finished(running, "import os\nreturn os.getcwd()"),
        ]
        assert [d["status"] for d in documents] == ["success", "success", "error", "error"]
        assert service.health_port is not None
        async with httpx.AsyncClient() as client:
            runner_text = (await client.get(f"http://127.0.0.1:{service.health_port}/metrics")).text
            health = await client.get(f"http://127.0.0.1:{service.health_port}/anything")
            broker_text = (await client.get(f"{running.url}/metrics")).text

    assert health.text == "OK"  # every other path is still n8n's health check
    # -- runner --
    assert sample(runner_text, "sandbox_runner_tasks_total", outcome="success", error_code="") == 2
    assert (
        sample(
            runner_text, "sandbox_runner_tasks_total", outcome="user_error", error_code="user_error"
        )
        == 1
    )
    assert (
        sample(
            runner_text,
            "sandbox_runner_tasks_total",
            outcome="security_violation",
            error_code="security_violation",
        )
        == 1
    )
    assert sample(runner_text, "sandbox_runner_container_start_seconds_count", start="warm") == 2
    assert sample(runner_text, "sandbox_runner_container_start_seconds_sum", start="warm") == 0.004
    assert sample(runner_text, "sandbox_runner_container_start_seconds_count", start="cold") == 1
    assert sample(runner_text, "sandbox_runner_container_start_seconds_sum", start="cold") == 0.3
    # 0.3 s lands in the 0.5 bucket, not in the 0.25 one.
    assert (
        sample(
            runner_text, "sandbox_runner_container_start_seconds_bucket", start="cold", le="0.25"
        )
        == 0
    )
    assert (
        sample(runner_text, "sandbox_runner_container_start_seconds_bucket", start="cold", le="0.5")
        == 1
    )
    assert sample(runner_text, "sandbox_runner_task_run_seconds_count") == 3
    assert sample(runner_text, "sandbox_runner_task_run_seconds_sum") == pytest.approx(0.54)
    assert sample(runner_text, "sandbox_runner_task_duration_seconds_count") == 4
    assert sample(runner_text, "sandbox_runner_queue_wait_seconds_count") == 4
    assert sample(runner_text, "sandbox_runner_retries_total", cause="conflict") == 2
    assert sample(runner_text, "sandbox_runner_running_tasks") == 0
    assert (
        sample(
            runner_text,
            "sandbox_runner_policy_info",
            image="sandbox-runner-task:test",
            policy_sha256="abc123",
            runner_id="metrics-unit",
            seccomp_sha256="feed",
        )
        == 1
    )
    # -- broker --
    assert sample(broker_text, "sandbox_broker_tasks_submitted_total") == 4
    assert sample(broker_text, "sandbox_broker_tasks_total", status="success", error_code="") == 2
    assert (
        sample(broker_text, "sandbox_broker_tasks_total", status="error", error_code="user_error")
        == 1
    )
    assert sample(broker_text, "sandbox_broker_queue_wait_seconds_count") == 4
    assert sample(broker_text, "sandbox_broker_task_duration_seconds_count") == 4
    assert sample(broker_text, "sandbox_broker_runners") == 1
    assert sample(broker_text, "sandbox_broker_running_tasks") == 0


async def test_up_serves_both_sides_on_one_registry() -> None:
    registry = CollectorRegistry()
    RunnerMetrics(registry).task_finished(
        outcome="timeout", error_code="timeout", audit=None, queue_wait_s=0.5
    )
    BrokerMetrics(registry).submitted.inc()
    text = exposition(registry).decode()
    assert sample(text, "sandbox_runner_tasks_total", outcome="timeout", error_code="timeout") == 1
    assert sample(text, "sandbox_runner_queue_wait_seconds_count") == 1
    assert sample(text, "sandbox_broker_tasks_submitted_total") == 1


async def test_broker_counts_offers_and_requeues_by_cause() -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    broker = Broker(
        BrokerConfig(accept_timeout_s=0.05), clock=clock, metrics=BrokerMetrics(registry)
    )
    runner = FakeRunner("r1")
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    task = broker.submit(Submission(tenant="t", code="return 1", items=[], mode=Mode.ALL_ITEMS))
    text = exposition(registry).decode()
    assert sample(text, "sandbox_broker_queued_tasks") == 1
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
    broker.runner_message(runner, TaskRejected(task_id=task.task_id, reason="busy"))
    broker.runner_message(runner, TaskOffer(offer_id="o2", valid_for=5000))
    advance(broker, clock, 0.15)  # no acceptance within the accept timeout: requeued
    broker.runner_message(runner, TaskOffer(offer_id="o3", valid_for=5000))
    broker.runner_message(runner, TaskOffer(offer_id="o4", valid_for=5000))
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    text = exposition(registry).decode()
    assert sample(text, "sandbox_broker_offers_total") == 4
    assert sample(text, "sandbox_broker_requeues_total", cause="declined") == 1
    assert sample(text, "sandbox_broker_requeues_total", cause="accept_timeout") == 1
    assert sample(text, "sandbox_broker_queue_wait_seconds_count") == 1
    assert sample(text, "sandbox_broker_running_tasks") == 1
    assert sample(text, "sandbox_broker_open_offers") == 1
    assert sample(text, "sandbox_broker_queued_tasks") == 0


async def test_broker_log_lines_about_a_task_carry_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from runner.logs import JsonFormatter

    broker = Broker(BrokerConfig())
    runner = FakeRunner("r1")
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    task = broker.submit(Submission(tenant="t", code="return 1", items=[], mode=Mode.ALL_ITEMS))
    with caplog.at_level("INFO", logger="runner.broker_server.core"):
        broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
        broker.runner_message(runner, TaskRejected(task_id=task.task_id, reason="busy"))
    declined = [r for r in caplog.records if "declined" in r.getMessage()]
    assert len(declined) == 1
    assert json.loads(JsonFormatter().format(declined[0]))["taskId"] == task.task_id


async def test_log_lines_inside_a_task_carry_its_id_also_from_worker_threads() -> None:
    import io

    from runner.logs import JsonFormatter
    from runner.pipeline import TaskRequest

    class LoggingSandbox(StubSandbox):
        async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
            await asyncio.to_thread(logger.warning, "container set-up failed, retrying")
            return await super().run(spec, limits)

    logger = logging.getLogger("runner.sandbox.docker")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # formats when the line is written, as the CLI's
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        pipeline = stub_pipeline()
        pipeline.sandbox = LoggingSandbox()
        report = await pipeline.run(TaskRequest(code="return 1", task_id="task-7"))
        logger.warning("after the task")
    finally:
        logger.removeHandler(handler)
    assert report.is_success
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["taskId"] == "task-7"
    assert inside["message"] == "container set-up failed, retrying"
    assert "taskId" not in after


async def test_tasks_that_never_reach_a_sandbox_report_are_counted_and_audited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runner.audit")
    async with service_and_broker() as (service, running):
        gone = await finished(running, "return 'daemon-gone'")
        bug = await finished(running, "return 'our-bug'")
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{service.health_port}/metrics")).text
    assert gone["error"]["message"] == "Task could not be run: The Docker daemon went away"
    # A ValueError of ours is an internal error, not a limit the broker asked for.
    assert bug["error"]["message"] == "Internal error of the runner: ValueError"
    assert (
        sample(
            text,
            "sandbox_runner_tasks_total",
            outcome="runner_error",
            error_code="docker_unavailable",
        )
        == 1
    )
    assert (
        sample(
            text,
            "sandbox_runner_tasks_total",
            outcome="internal_error",
            error_code="internal_error",
        )
        == 1
    )
    assert (
        sample(
            text, "sandbox_runner_tasks_total", outcome="rejected", error_code="limit_above_ceiling"
        )
        is None
    )
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runner.audit"]
    assert [(r["outcome"], r["errorCode"]) for r in records] == [
        ("runner_error", "docker_unavailable"),
        ("internal_error", "internal_error"),
    ]
    assert all(r["brokerRunnerId"] == service.runner_id for r in records)
    assert service._accepted_at == {}


async def test_a_task_whose_settings_arrive_during_the_drain_is_run_and_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runner.audit")
    settings = Settings(runner_id="drain-unit", graceful_shutdown_timeout_s=5)
    service = RunnerService(
        settings, stub_pipeline(), broker_uri="http://127.0.0.1:9", handle_signals=False
    )
    machine = service.machine

    def feed(**message: Any) -> None:
        machine.receive_frame(json.dumps(message))

    def sent() -> list[dict[str, Any]]:
        return [json.loads(out.frame) for out in machine.frames_to_send()]

    machine.connection_made()
    feed(type="broker:inforequest")
    feed(type="broker:runnerregistered")
    offer = next(m for m in sent() if m["type"] == "runner:taskoffer")
    feed(type="broker:taskofferaccept", taskId="t1", offerId=offer["offerId"])
    assert [m["type"] for m in sent()] == ["runner:taskaccepted"]

    machine.begin_shutdown()
    drain = asyncio.create_task(service._wait_for_accepted_tasks(5))
    await asyncio.sleep(0.05)
    assert not drain.done()  # accepted, settings not here yet: still the runner's task
    feed(
        type="broker:tasksettings",
        taskId="t1",
        settings={"code": "return 1", "nodeMode": "runOnceForAllItems", "items": []},
    )
    service._handle_events()
    assert await asyncio.wait_for(drain, 5) == set()
    done = [m for m in sent() if m["type"] == "runner:taskdone"]
    assert [m["taskId"] for m in done] == ["t1"]
    # The wait for its settings (at least the 50 ms above) counts as its queueing.
    (record,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runner.audit"]
    assert record["queueMs"] >= 50
