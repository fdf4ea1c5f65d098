"""The embedded broker's HTTP API fuzzed from its own OpenAPI document (schemathesis).

Every operation gets generated requests (valid by the schema, and then some: keys,
bodies, schemas in ``inputSchema``...), in-process through the ASGI app, with no
runner connected: whatever comes in, the answer is never a 5xx. The number of
examples per operation is bounded so the module runs in seconds.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from fakes import FakeRunner
from hypothesis import HealthCheck, settings

from runner.broker_server.app import ApiConfig, create_app
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.submission import TaskLimits
from runner.broker_server.tokens import GrantTokens
from runner.protocol.codec import decode_broker_message, encode
from runner.protocol.messages import (
    RunnerInfo,
    TaskAccepted,
    TaskDone,
    TaskDoneData,
    TaskOffer,
    TaskOfferAccept,
    TaskSettingsMessage,
)

pytestmark = pytest.mark.timeout(120)

KEY = "fuzz-key"
MAX_WAIT_S = 0.05  # `?wait=` up to 300 s is valid, but no runner will ever answer here


def make_app(broker: Broker | None = None) -> Any:
    broker = broker or Broker(BrokerConfig(default_timeout_s=60, queue_timeout_s=0.01))
    return create_app(
        BrokerDriver(broker),
        GrantTokens(30),
        ApiConfig(
            auth_token="fuzz-auth-token",
            api_keys={KEY: "tenant"},
            max_request_bytes=64 * 1024,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
        ),
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", make_app())


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case: Any) -> None:
    if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
        case.query["wait"] = min(case.query["wait"], MAX_WAIT_S)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code < 300:
        content_type = response.headers["content-type"]  # schemathesis: a list of values
        assert content_type[0].startswith("application/json"), content_type


# -- what the fuzzer found, pinned ------------------------------------------------------


def api_client() -> tuple[httpx.AsyncClient, Broker]:
    broker = Broker(BrokerConfig(default_timeout_s=60, queue_timeout_s=0.01))
    transport = httpx.ASGITransport(app=make_app(broker), client=("127.0.0.1", 5000))
    client = httpx.AsyncClient(transport=transport, base_url="http://broker")
    return client, broker


HEADERS = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"code": "x", "items": "\\ud800"}', id="surrogate-in-a-422-echo"),
        pytest.param(b'{"code": "x", "mode": "\\udfff"}', id="surrogate-in-a-literal-echo"),
        pytest.param(
            b'{"code": "x", "items": [{"a": "\\ud800"}], "inputSchema": {"properties": '
            b'{"a": {"type": "integer"}}}}',
            id="surrogate-in-a-schema-message",
        ),
    ],
)
async def test_lone_surrogates_in_a_request_get_a_clear_4xx_not_a_500(body: bytes) -> None:
    client, _ = api_client()
    async with client:
        response = await client.post("/v1/tasks", content=body, headers=HEADERS)
    assert response.status_code == 422
    assert "\\ud800" in response.text or "\\udfff" in response.text  # escaped, not mangled


async def test_a_task_with_lone_surrogates_is_accepted_and_travels_to_a_runner_intact() -> None:
    client, broker = api_client()
    runner = FakeRunner()
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=-1))
    body = b'{"code": "return _items", "items": [{"json": {"k\\udfff": "\\ud800"}}]}'
    async with client:
        response = await client.post("/v1/tasks", content=body, headers=HEADERS)
    assert response.status_code == 202
    [accept] = [m for m in runner.sent if isinstance(m, TaskOfferAccept)]
    broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
    [settings_message] = [m for m in runner.sent if isinstance(m, TaskSettingsMessage)]
    frame = encode(settings_message)  # what the broker's writer sends
    frame.encode("utf-8")  # a text frame it can send (it raised before)
    assert decode_broker_message(frame).settings["items"] == [{"json": {"k\udfff": "\ud800"}}]


async def test_an_unresolvable_ref_in_input_schema_is_a_422() -> None:
    client, _ = api_client()
    async with client:
        response = await client.post(
            "/v1/tasks",
            json={"code": "return 1", "items": [{"a": 1}], "inputSchema": {"$ref": "#/nope"}},
            headers=HEADERS,
        )
    assert response.status_code == 422
    assert "cannot be resolved" in response.json()["detail"]


async def test_an_unresolvable_ref_in_output_schema_fails_the_task_not_the_broker() -> None:
    client, broker = api_client()
    runner = FakeRunner()
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=-1))
    schema = {"$ref": "https://example.invalid/schema.json"}  # never fetched
    async with client:
        response = await client.post(
            "/v1/tasks", json={"code": "return 1", "outputSchema": schema}, headers=HEADERS
        )
        assert response.status_code == 202
        [accept] = [m for m in runner.sent if isinstance(m, TaskOfferAccept)]
        broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
        # Before the fix this raised out of the broker's handling of the runner's frame.
        broker.runner_message(runner, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=1)))
        document = (await client.get(f"/v1/tasks/{accept.task_id}", headers=HEADERS)).json()
    assert document["status"] == "error"
    assert document["error"]["code"] == "output_schema_violation"
    assert "cannot be resolved" in document["error"]["description"]
