"""Results checked against ``outputSchema`` off the event loop, and submissions checked
before they reach the broker core (runner/broker_server/{core,driver,app}.py).

The core parks a result its inline trial cannot settle (``defer_result_checks``) and
reports it; the task stays running, with no timer, until the verdict comes back,
whatever its runner or its caller does meanwhile. Through the driver and the HTTP API
the documents and the 422s are those of an inline check, and a check past a worker's
limit is refused for its own task only. Fake clock for the core; no timed assertion.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fakes import FakeClock, FakeRunner, advance, connect
from helpers import nested_list

from runner.broker_server.app import ApiConfig, create_app
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.events import CheckResult, TaskFinished
from runner.broker_server.schema_pool import SchemaPool
from runner.broker_server.schemas import validate_result
from runner.broker_server.server import running_broker
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import TaskStatus
from runner.broker_server.tokens import GrantTokens
from runner.metrics import exposition
from runner.protocol.messages import (
    RunnerInfo,
    TaskAccepted,
    TaskDone,
    TaskDoneData,
    TaskErrorBody,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
)
from runner.sandbox.base import Mode
from runner.settings import Settings

pytestmark = pytest.mark.timeout(120)

INTEGERS = {"items": {"type": "integer"}}
# More values than an inline trial takes: a worker's to check.
LARGE_RESULT = [*range(1500), "x"]
LARGE_PROBLEM = "result[1500]: 'x' is not of type 'integer'"
EXPONENTIAL = {"anyOf": [{"items": {"$ref": "#"}, "minItems": 5}, {"items": {"$ref": "#"}}]}
OVER_BUDGET = (
    "validating against the schema takes more checks than the broker allows; "
    "simplify the schema or send less data"
)


def submission(**kw: Any) -> Submission:
    return Submission(tenant="t", code="return 1", items=[], mode=Mode.ALL_ITEMS, **kw)


def running_task(broker: Broker, runner: FakeRunner, **kw: Any) -> str:
    task = broker.submit(submission(**kw))
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    return task.task_id


def done(task_id: str, result: Any, prints: Any = None) -> TaskDone:
    report = {"audit": {"outcome": "success"}, "prints": prints or [["hello"]]}
    return TaskDone(task_id=task_id, data=TaskDoneData(result=result), sandbox=report)


# -- the core, with a fake clock -----------------------------------------------------------


def deferring_broker() -> tuple[Broker, FakeClock]:
    clock = FakeClock()
    config = BrokerConfig(defer_result_checks=True, default_timeout_s=5, runner_lost_grace_s=1)
    return Broker(config, clock=clock), clock


def test_a_result_the_trial_settles_ends_the_task_at_once() -> None:
    broker, _ = deferring_broker()
    runner = connect(broker, offers=1)
    schema = {"type": "array", "items": {"type": "object", "required": ["id"]}}
    task_id = running_task(broker, runner, output_schema=schema)
    broker.runner_message(runner, done(task_id, [{"id": 1}, {}]))
    task = broker.get(task_id)
    assert task is not None
    assert task.document is not None
    assert task.document["error"]["description"] == "result[1]: 'id' is a required property"
    assert broker.events() == [TaskFinished(task_id)]


def test_a_parked_result_keeps_its_task_running_until_the_verdict() -> None:
    broker, clock = deferring_broker()
    runner = connect(broker, offers=1)
    task_id = running_task(broker, runner, output_schema=INTEGERS)
    broker.runner_message(runner, done(task_id, LARGE_RESULT))
    task = broker.get(task_id)
    assert task is not None
    assert (task.status, task.document, task.timer) == (TaskStatus.RUNNING, None, None)
    assert broker.events() == [CheckResult(task_id, 1)]
    # Its result is in: the runner leaving, its timeout passing, a cancel and a second
    # completion change nothing.
    broker.runner_disconnected(runner)
    advance(broker, clock, 100)
    broker.cancel(task)
    broker.runner_message(runner, done(task_id, [1]))
    assert (task.status, task.document) == (TaskStatus.RUNNING, None)
    broker.result_checked(task_id, 2, None)  # another attempt's verdict: not this one's
    assert task.status is TaskStatus.RUNNING
    broker.result_checked(task_id, 1, validate_result(INTEGERS, LARGE_RESULT))
    assert task.document is not None
    assert task.document["error"]["code"] == "output_schema_violation"
    assert task.document["error"]["description"] == LARGE_PROBLEM
    assert task.document["prints"] == [["hello"]]
    assert task.document["audit"] == {"outcome": "success"}
    assert task.parked is None
    assert broker.events() == [TaskFinished(task_id)]


def test_a_verdict_makes_the_document_an_inline_check_makes() -> None:
    documents = []
    for defer in (False, True):
        broker = Broker(BrokerConfig(defer_result_checks=defer))
        runner = connect(broker, offers=1)
        task_id = running_task(broker, runner, output_schema=INTEGERS)
        broker.runner_message(runner, done(task_id, list(range(1500))))
        if defer:
            assert broker.events() == [CheckResult(task_id, 1)]
            broker.result_checked(task_id, 1, None)
        task = broker.get(task_id)
        assert task is not None
        documents.append(task.document)
    assert documents[0] == documents[1]
    assert documents[1] is not None
    assert documents[1]["status"] == "success"


def test_an_error_report_is_never_parked() -> None:
    broker, _ = deferring_broker()
    runner = connect(broker, offers=1)
    task_id = running_task(broker, runner, output_schema=INTEGERS)
    error = TaskErrorBody(message="boom")
    broker.runner_message(runner, TaskErrorMessage(task_id=task_id, error=error))
    assert broker.events() == [TaskFinished(task_id)]


# -- through the driver and the HTTP API ---------------------------------------------------

KEY = "schema-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
OTHER_TENANT = {"Authorization": "Bearer other-key"}


class Api:
    def __init__(self, client: httpx.AsyncClient, broker: Broker, pool: SchemaPool) -> None:
        self.client, self.broker, self.pool = client, broker, pool
        self.runner = FakeRunner()
        broker.runner_connected(self.runner)
        broker.runner_message(self.runner, RunnerInfo())

    async def run(self, body: dict[str, Any], result: Any, *, then_leave: bool = False) -> Any:
        """Submit, let the runner return ``result``; the document (waited for)."""
        offers = len(self.runner.of(TaskOfferAccept))
        self.broker.runner_message(self.runner, TaskOffer(offer_id=f"o{offers}", valid_for=-1))
        response = await self.client.post("/v1/tasks", json=body, headers=HEADERS)
        assert response.status_code == 202, response.text
        task_id = response.json()["taskId"]
        self.broker.runner_message(self.runner, TaskAccepted(task_id=task_id))
        self.broker.runner_message(self.runner, done(task_id, result))
        if then_leave:  # the result is in before the runner goes
            self.broker.runner_disconnected(self.runner)
        read = await self.client.get(f"/v1/tasks/{task_id}?wait=60", headers=HEADERS)
        assert read.status_code == 200, read.text
        return read.json()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    broker = Broker(BrokerConfig(defer_result_checks=True, default_timeout_s=60))
    pool = SchemaPool(max_payload_bytes=4 * 1024 * 1024, cpu_s=1)
    driver = BrokerDriver(broker, pool)
    app = create_app(
        driver,
        GrantTokens(30),
        ApiConfig(
            auth_token="auth",
            api_keys={KEY: "t", "other-key": "other"},
            max_request_bytes=4 * 1024 * 1024,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        yield Api(client, broker, pool)
    pids = pool.pids()
    await driver.aclose()
    await pool.aclose()
    for pid in pids:  # no schema worker outlives the broker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_an_output_schema_checked_in_a_worker_keeps_its_documents(api: Api) -> None:
    document = await api.run({"code": "return 1", "outputSchema": INTEGERS}, LARGE_RESULT)
    assert document["status"] == "error"
    assert document["error"] == {
        "message": "Result does not match outputSchema",
        "description": LARGE_PROBLEM,
        "code": "output_schema_violation",
        "stage": "result",
    }
    # The metering's own refusal, reached in the worker with its full budget.
    body = {"code": "return 1", "outputSchema": EXPONENTIAL}
    document = await api.run(body, nested_list(30))
    assert document["error"]["description"] == f"result: {OVER_BUDGET}"
    assert api.pool.started >= 1
    # A result that is in before its runner leaves is the task's result.
    body = {"code": "return 1", "outputSchema": INTEGERS}
    document = await api.run(body, list(range(1500)), then_leave=True)
    assert document["status"] == "success"
    assert document["result"] == list(range(1500))


async def test_a_result_check_past_the_cpu_limit_fails_that_task_only(api: Api) -> None:
    rows = [nested_list(25)] * 20_000  # metered budget: seconds of CPU; the limit is 1 s
    body = {"code": "return 1", "outputSchema": {"items": EXPONENTIAL}}
    document = await api.run(body, rows)
    assert document["error"]["code"] == "output_schema_violation"
    assert document["error"]["description"] == (
        "result: validating against the schema needed more than the 1 s of CPU time the "
        "broker allows a schema check; simplify the schema or send less data"
    )
    document = await api.run({"code": "return 1", "outputSchema": INTEGERS}, [1, 2])
    assert document["status"] == "success"


async def test_input_schema_refusals_keep_their_answers(api: Api) -> None:
    async def submit(body: dict[str, Any]) -> httpx.Response:
        return await api.client.post("/v1/tasks", json=body, headers=HEADERS)

    # Checked in a worker (too many items for an inline trial): the same 422 as inline.
    items = [{"n": n} for n in range(1500)] + [{"n": "x"}]
    schema = {"properties": {"n": {"type": "integer"}}}
    response = await submit({"code": "x", "items": items, "inputSchema": schema})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "Items do not match inputSchema: items[1500].json.n: 'x' is not of type 'integer'"
    )
    response = await submit(
        {"code": "x", "items": [{"json": nested_list(30)}] * 2, "inputSchema": EXPONENTIAL}
    )
    assert (
        response.json()["detail"] == f"Items do not match inputSchema: items[0].json: {OVER_BUDGET}"
    )
    # Past the worker's CPU limit: refused, in the metering's words.
    burner = {
        "code": "x",
        "items": [{"json": nested_list(25)}] * 20_000,
        "inputSchema": EXPONENTIAL,
    }
    response = await submit(burner)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "Items do not match inputSchema: items: validating against the schema needed more "
        "than the 1 s of CPU time the broker allows a schema check; simplify the schema or "
        "send less data"
    )
    # The schema itself, refused before any item is looked at.
    response = await submit({"code": "x", "inputSchema": {"type": [{"x": i} for i in range(3000)]}})
    assert (
        response.json()["detail"] == "inputSchema is too large to check (more than 100000 checks)"
    )
    # And the broker serves on.
    response = await submit({"code": "x", "items": [{"n": 1}], "inputSchema": schema})
    assert response.status_code == 202
    assert json.loads(response.text)["status"] == "queued"


async def test_a_tenants_hostile_input_schema_does_not_hold_another_tenants_submission(
    api: Api,
) -> None:
    hostile = {
        "code": "x",
        "items": [{"json": nested_list(25)}] * 20_000,  # seconds of CPU; the limit is 1 s
        "inputSchema": EXPONENTIAL,
    }
    ordinary = {
        "code": "x",
        "items": [{"n": n} for n in range(1500)],  # a worker's to check, too
        "inputSchema": {"properties": {"n": {"type": "integer"}}},
    }
    post = api.client.post
    slow = asyncio.create_task(post("/v1/tasks", json=hostile, headers=HEADERS))
    while api.pool.started == 0:  # noqa: ASYNC110 - the pool has no event for it; a few turns
        await asyncio.sleep(0.01)
    fast = asyncio.create_task(post("/v1/tasks", json=ordinary, headers=OTHER_TENANT))
    done, _ = await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
    assert done == {fast}
    assert fast.result().status_code == 202
    refused = await slow
    assert refused.status_code == 422
    assert "needed more than the 1 s of CPU time" in refused.json()["detail"]


async def test_the_broker_server_checks_schemas_in_workers_and_stops_them() -> None:
    settings = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1)
    async with (
        running_broker(settings, auth_token="secret-auth-token") as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        assert running.broker.config.defer_result_checks
        items = [{"n": n} for n in range(1500)] + [{"n": "x"}]
        schema = {"properties": {"n": {"type": "integer"}}}
        body = {"code": "return 1", "items": items, "inputSchema": schema}
        response = await client.post("/v1/tasks", json=body)
        assert response.status_code == 422
        assert response.json()["detail"] == (
            "Items do not match inputSchema: items[1500].json.n: 'x' is not of type 'integer'"
        )
        pids = running.driver.schemas.pids()
        assert pids  # checked in a worker, and counted
        text = exposition(running.registry).decode()
        assert 'sandbox_broker_schema_worker_checks_total{limit=""} 1.0' in text
    for pid in pids:  # stopped with the broker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
