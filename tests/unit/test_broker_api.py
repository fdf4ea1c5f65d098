"""The embedded broker's HTTP API: auth, tenants, validation, size limits, documents.

No runner is connected here: these are the API's own rules (dispatch with real
runners is tested in tests/integration). Requests go through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from fakes import FakeClock, FakeRunner, advance
from fastapi import FastAPI
from helpers import until
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from runner.broker_server import server as server_module
from runner.broker_server.app import ApiConfig, LimitSource, create_app
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.server import running_broker
from runner.broker_server.submission import TaskLimits
from runner.broker_server.tokens import GrantTokens
from runner.errors import LimitAboveCeiling
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.policy import load_policy
from runner.protocol.codec import encode
from runner.protocol.messages import RunnerInfo, TaskDone, TaskDoneData, TaskOffer
from runner.protocol.settings import TaskLimitsRequest
from runner.sandbox.base import MIB, Limits
from runner.service import RunnerService
from runner.settings import Settings

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def make(
    api_keys: dict[str, str] | None = None,
    max_request_bytes: int = 64 * 1024,
    client: tuple[str, int] = ("127.0.0.1", 5000),
    config: BrokerConfig | None = None,
) -> tuple[httpx.AsyncClient, Broker]:
    broker = Broker(config or BrokerConfig(default_timeout_s=60))
    app = make_app(broker, api_keys, max_request_bytes)
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://broker"), broker


# Drivers made by make_app: each has a pool of schema workers of its own, stopped after
# its test (a driver nobody closes keeps them until it is collected).
_DRIVERS: list[BrokerDriver] = []


@pytest.fixture(autouse=True)
def _stop_schema_workers() -> Iterator[None]:
    yield
    while _DRIVERS:
        asyncio.run(_DRIVERS.pop().aclose())


def make_app(
    broker: Broker,
    api_keys: dict[str, str] | None = None,
    max_request_bytes: int = 64 * 1024,
    tokens: GrantTokens | None = None,
) -> FastAPI:
    _DRIVERS.append(BrokerDriver(broker))
    return create_app(
        _DRIVERS[-1],
        tokens or GrantTokens(30),
        ApiConfig(
            auth_token="secret-auth-token",
            api_keys=api_keys if api_keys is not None else KEYS,
            max_request_bytes=max_request_bytes,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
        ),
    )


def _nested(leaf: Any, key: str, depth: int) -> Any:
    for _ in range(depth):
        leaf = {key: leaf}
    return leaf


@pytest.fixture
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, Broker]]:
    client, broker = make()
    async with client:
        yield client, broker


async def test_submit_returns_202_with_the_task_id_and_state(api: Any) -> None:
    client, _ = api
    response = await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/v1/tasks/{body['taskId']}"


async def test_wait_returns_the_document_once_the_task_ends(api: Any) -> None:
    client, broker = api

    import asyncio

    from runner.protocol.messages import RunnerInfo, TaskAccepted, TaskOffer

    runner = FakeRunner()
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))

    async def play_runner() -> None:
        while not any(type(m).__name__ == "TaskOfferAccept" for m in runner.sent):  # noqa: ASYNC110 - FakeRunner only records
            await asyncio.sleep(0.01)
        accept = next(m for m in runner.sent if type(m).__name__ == "TaskOfferAccept")
        broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
        broker.runner_message(
            runner, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=[1]))
        )

    player = asyncio.create_task(play_runner())
    response = await client.post("/v1/tasks?wait=5", json={"code": "return [1]"}, headers=A)
    await player
    assert response.status_code == 200
    assert response.json() == {"status": "success", "result": [1], "prints": [], "audit": None}


async def test_missing_or_wrong_api_key_is_401(api: Any) -> None:
    client, _ = api
    assert (await client.post("/v1/tasks", json={"code": "x"})).status_code == 401
    wrong = await client.post(
        "/v1/tasks", json={"code": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "Invalid API key"}
    assert (
        await client.get("/v1/tasks", headers={"Authorization": "Basic a2V5LWE="})
    ).status_code == 401


async def test_a_tenant_sees_only_its_own_tasks(api: Any) -> None:
    client, _ = api
    task_id = (await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)).json()[
        "taskId"
    ]
    assert (await client.get(f"/v1/tasks/{task_id}", headers=A)).status_code == 202
    assert (await client.get(f"/v1/tasks/{task_id}", headers=B)).status_code == 404
    assert (await client.delete(f"/v1/tasks/{task_id}", headers=B)).status_code == 404
    assert [t["taskId"] for t in (await client.get("/v1/tasks", headers=A)).json()["tasks"]] == [
        task_id
    ]
    assert (await client.get("/v1/tasks", headers=B)).json()["tasks"] == []


async def test_cancel_a_queued_task(api: Any) -> None:
    client, _ = api
    task_id = (await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)).json()[
        "taskId"
    ]
    cancelled = await client.delete(f"/v1/tasks/{task_id}", headers=A)
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert (await client.get(f"/v1/tasks/{task_id}", headers=A)).status_code == 200


async def test_a_queued_task_says_why_it_waits_until_it_ends(api: Any) -> None:
    client, broker = api
    submitted = await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
    assert submitted.status_code == 202
    task_id = submitted.json()["taskId"]
    no_runner = {
        "code": "no_runner",
        "message": "No runner is connected to this broker. Start one with "
        "`sandbox-runner serve`, N8N_RUNNERS_TASK_BROKER_URI set to this broker's URL "
        "and N8N_RUNNERS_AUTH_TOKEN to its auth token.",
    }
    assert submitted.json()["waitReason"] == no_runner
    polled = await client.get(f"/v1/tasks/{task_id}?wait=0.05", headers=A)
    assert polled.status_code == 202
    assert polled.json()["waitReason"] == no_runner
    (listed,) = (await client.get("/v1/tasks", headers=A)).json()["tasks"]
    assert listed["waitReason"] == no_runner
    runner = FakeRunner()
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    busy = (await client.get(f"/v1/tasks/{task_id}", headers=A)).json()
    assert busy["waitReason"]["code"] == "runners_busy"
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
    offered = (await client.get(f"/v1/tasks/{task_id}", headers=A)).json()
    assert (offered["status"], offered["waitReason"]) == ("offered", None)
    cancelled = await client.delete(f"/v1/tasks/{task_id}", headers=A)
    assert "waitReason" not in cancelled.json()  # a document: its shape is unchanged


async def test_queue_timeout_through_the_api_names_the_missing_runner() -> None:
    client, _ = make(config=BrokerConfig(queue_timeout_s=0.05))
    async with client:
        answer = await client.post("/v1/tasks?wait=30", json={"code": "return 1"}, headers=A)
    assert answer.status_code == 200
    error = answer.json()["error"]
    assert error["code"] == "queue_timeout"
    assert error["message"] == (
        "No runner took the task in time: no runner was connected to this broker while it waited"
    )
    assert "sandbox-runner serve" in error["description"]


async def test_a_deadline_the_core_fires_answers_the_long_poll_at_once() -> None:
    # The core's time is a fake clock here: its deadline passes when the test says, and
    # the poll is answered from the core's event, not from a real timer.
    clock = FakeClock()
    broker = Broker(BrokerConfig(queue_timeout_s=60), clock=clock)
    transport = httpx.ASGITransport(app=make_app(broker), client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        poll = asyncio.create_task(
            client.post("/v1/tasks?wait=300", json={"code": "return 1"}, headers=A)
        )
        await until(lambda: broker.recent("tenant-a", 1))
        assert not poll.done()
        advance(broker, clock, 60)
        answer = await asyncio.wait_for(poll, timeout=30)  # a hang guard, far below 300 s
    assert answer.status_code == 200
    assert answer.json()["error"]["code"] == "queue_timeout"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "code"),
        ({"code": 5}, "code"),
        ({"code": "x", "mode": "sideways"}, "mode"),
        ({"code": "x", "items": [1, 2]}, "items"),
        ({"code": "x", "surprise": True}, "surprise"),
        ({"code": "x", "timeoutSeconds": -1}, "timeoutSeconds"),
        (
            {"code": "x", "timeoutSeconds": 500},
            "timeoutSeconds 500 exceeds 120 s, this broker's per-task limit",
        ),
        (
            {"code": "x", "memoryMb": 4096},
            "memoryMb 4096 exceeds 512 MiB, this broker's per-task limit",
        ),
        (
            {"code": "x", "inputSchema": {"type": "nonsense"}},
            "inputSchema is not a valid JSON Schema",
        ),
        (
            {
                "code": "x",
                "items": [{"age": "old"}],
                "inputSchema": {"properties": {"age": {"type": "integer"}}},
            },
            "items[0].json.age: 'old' is not of type 'integer'",
        ),
        (
            {
                "code": "x",
                "items": [{"s": "a" * 40 + "b"}],
                "inputSchema": {"properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}},
            },
            "inputSchema uses properties.s.pattern: regular-expression keywords",
        ),
        (
            {
                "code": "x",
                "outputSchema": {"items": {"patternProperties": {"^(a|aa)+$": {}}}},
            },
            "outputSchema uses items.patternProperties",
        ),
        (
            {
                "code": "x",
                "items": [{"a": [{"k": i} for i in range(50)]}],
                "inputSchema": {"properties": {"a": {"uniqueItems": True}}},
            },
            "inputSchema uses properties.a.uniqueItems: uniqueItems is not supported, because "
            "checking it takes time quadratic",
        ),
        (
            {"code": "x", "outputSchema": {"$defs": {"x": {"items": {"uniqueItems": True}}}}},
            "outputSchema uses $defs.x.items.uniqueItems",
        ),
        (
            # the meta-schema's own uniqueItems (on `type`) is metered while checking
            {"code": "x", "inputSchema": {"type": [{"x": i} for i in range(3000)]}},
            "inputSchema is too large to check (more than 100000 checks)",
        ),
        (
            {"code": "x", "inputSchema": _nested({}, "not", 900)},
            "inputSchema nests too deeply to check",
        ),
        (
            {
                "code": "x",
                "items": [{"a": _nested(1, "a", 70)}],
                "inputSchema": {"type": "object"},
            },
            "items[0].json: nests deeper than 64 levels, too deep to validate",
        ),
        (
            {"code": "x", "items": [{"a": 1}], "inputSchema": {"anyOf": [{"$ref": "#"}]}},
            "items[0].json: the schema recurses too deeply to validate",
        ),
        (
            {
                "code": "x",
                "items": [{"a": 1000 + i} for i in range(200)],  # all valid, 200 x 1000
                "inputSchema": {"properties": {"a": {"enum": list(range(1000, 2000))}}},
            },
            "takes more checks than the broker allows",
        ),
    ],
    ids=[
        "no-code",
        "code-not-str",
        "bad-mode",
        "items-not-objects",
        "unknown-field",
        "negative-timeout",
        "timeout-over-ceiling",
        "memory-over-ceiling",
        "bad-schema",
        "input-schema-path",
        "regex-pattern",
        "regex-pattern-properties",
        "unique-items",
        "unique-items-in-defs",
        "meta-schema-unique-items",
        "deep-schema",
        "deep-items",
        "ref-cycle",
        "enum-budget-over-all-items",
    ],
)
async def test_bad_bodies_get_clear_4xx(api: Any, body: dict[str, Any], fragment: str) -> None:
    client, broker = api
    response = await client.post("/v1/tasks", json=body, headers=A)
    assert response.status_code == 422
    assert fragment in response.text
    assert broker.recent("tenant-a", 10) == []


async def test_a_property_named_pattern_is_data_not_a_regex(api: Any) -> None:
    client, _ = api
    schema = {
        "properties": {"pattern": {"type": "string"}},
        "required": ["pattern"],
        "examples": [{"pattern": "(a+)+"}],
    }
    response = await client.post(
        "/v1/tasks",
        json={"code": "return 1", "items": [{"pattern": "x"}], "inputSchema": schema},
        headers=A,
    )
    assert response.status_code == 202, response.text


async def test_unique_items_false_asks_for_nothing_and_is_accepted(api: Any) -> None:
    client, _ = api
    schema = {"properties": {"tags": {"type": "array", "uniqueItems": False}}}
    response = await client.post(
        "/v1/tasks",
        json={"code": "return 1", "items": [{"tags": ["a", "a"]}], "inputSchema": schema},
        headers=A,
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("keyword", ["unevaluatedProperties", "unevaluatedItems"])
async def test_unevaluated_keywords_are_refused(api: Any, keyword: str) -> None:
    client, _ = api
    response = await client.post(
        "/v1/tasks",
        json={"code": "return 1", "outputSchema": {"$defs": {"d": {keyword: False}}}},
        headers=A,
    )
    assert response.status_code == 422
    assert f"outputSchema uses $defs.d.{keyword}: {keyword} is not supported" in response.text


async def test_not_json_is_a_4xx(api: Any) -> None:
    client, _ = api
    response = await client.post(
        "/v1/tasks", content=b"{nope", headers={**A, "Content-Type": "application/json"}
    )
    assert response.status_code == 422


async def test_a_body_with_more_json_values_than_the_limit_is_413_before_parsing() -> None:
    """Bytes do not bound what a parse costs (16 MiB of ``[{},{},...]`` peaked at ~2.1 GB
    in the broker): the values are counted, as brackets and commas, before any parse."""
    broker = Broker(BrokerConfig(default_timeout_s=60))
    app = create_app(
        BrokerDriver(broker),
        GrantTokens(30),
        ApiConfig(
            auth_token="secret-auth-token",
            api_keys=KEYS,
            max_request_bytes=64 * 1024,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
            max_request_json_values=1000,
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        many = {"code": "return []", "items": [{}] * 600}  # 601 {, 600 commas, 2 [
        refused = await client.post("/v1/tasks", json=many, headers=A)
        assert refused.status_code == 413
        assert refused.json()["detail"].startswith(
            "Request body holds more than 1000 JSON values (1203 brackets and commas"
        )
        assert "SANDBOX_MAX_REQUEST_JSON_VALUES" in refused.json()["detail"]
        # Brackets and commas inside strings count too: an over-estimate refuses early.
        commas = await client.post("/v1/tasks", json={"code": "," * 1001}, headers=A)
        assert commas.status_code == 413
        fewer = {"code": "return []", "items": [{}] * 400}
        assert (await client.post("/v1/tasks", json=fewer, headers=A)).status_code == 202
    assert len(broker.recent("tenant-a", 10)) == 1  # only the one within the limit


async def test_the_broker_counts_json_values_by_default() -> None:
    settings = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1)
    assert settings.max_request_json_values == 1_000_000
    async with (
        running_broker(settings, auth_token="secret-auth-token") as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        body = b'{"code":"return []","items":[' + b",".join([b"{}"] * 500_001) + b"]}"
        refused = await client.post(
            "/v1/tasks", content=body, headers={"Content-Type": "application/json"}
        )
    assert refused.status_code == 413
    assert "more than 1000000 JSON values" in refused.json()["detail"]


async def test_too_large_body_is_413() -> None:
    client, broker = make(max_request_bytes=1024)
    async with client:
        response = await client.post("/v1/tasks", json={"code": "x" * 5000}, headers=A)
        assert response.status_code == 413
        assert "exceeds the limit of 1024 bytes" in response.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed
            for _ in range(10):
                yield b"x" * 500

        streamed = await client.post("/v1/tasks", content=chunks(), headers=A)
        assert streamed.status_code == 413
        # and it keeps serving
        assert (
            await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
        ).status_code == 202
    assert len(broker.recent("tenant-a", 10)) == 1


async def test_without_keys_only_loopback_is_served() -> None:
    local, _ = make(api_keys={})
    async with local:
        response = await local.post("/v1/tasks", json={"code": "return 1"})
        assert response.status_code == 202
    remote, _ = make(api_keys={}, client=("203.0.113.9", 5000))
    async with remote:
        response = await remote.post("/v1/tasks", json={"code": "return 1"})
        assert response.status_code == 403
        assert "loopback" in response.json()["detail"]


async def test_runner_auth_endpoint() -> None:
    client, _ = make()
    async with client:
        ok = await client.post("/runners/auth", json={"token": "secret-auth-token"})
        assert ok.status_code == 200
        assert len(ok.json()["data"]["token"]) == 64
        assert (await client.post("/runners/auth", json={"token": "wrong"})).status_code == 403
        assert (await client.post("/runners/auth", json={"token": ""})).status_code == 400
        assert (await client.post("/runners/auth", content=b"nope")).status_code == 400
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_openapi_document_describes_the_task_api(api: Any) -> None:
    client, _ = api
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/tasks", "/v1/tasks/{task_id}", "/runners/auth", "/healthz"} <= set(schema["paths"])
    create = schema["components"]["schemas"]["TaskCreate"]["properties"]
    assert {
        "code",
        "items",
        "mode",
        "continueOnFail",
        "timeoutSeconds",
        "memoryMb",
        "cpus",
        "inputSchema",
        "outputSchema",
    } <= set(create)
    state = schema["components"]["schemas"]["TaskState"]["properties"]
    assert "waitReason" in state


async def test_a_tenant_over_its_backlog_cap_gets_429_and_others_are_served() -> None:
    client, broker = make(config=BrokerConfig(max_unfinished_per_tenant=2))
    async with client:
        for _ in range(2):
            assert (
                await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
            ).status_code == 202
        refused = await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
        assert refused.status_code == 429
        assert refused.json() == {
            "detail": "Tenant 'tenant-a' already has 2 unfinished tasks (the broker's limit); "
            "wait for some to finish or cancel some"
        }
        assert refused.headers["retry-after"] == "1"
        assert (
            await client.post("/v1/tasks", json={"code": "return 1"}, headers=B)
        ).status_code == 202
        first = broker.recent("tenant-a", 10)[-1]
        assert (await client.delete(f"/v1/tasks/{first.task_id}", headers=A)).status_code == 200
        assert (
            await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)
        ).status_code == 202


async def test_another_tenants_volume_does_not_evict_my_result() -> None:
    client, _ = make(config=BrokerConfig(max_tasks_kept=3))
    async with client:
        mine = (await client.post("/v1/tasks", json={"code": "return 1"}, headers=B)).json()
        await client.delete(f"/v1/tasks/{mine['taskId']}", headers=B)
        for _ in range(10):
            task = (await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)).json()
            await client.delete(f"/v1/tasks/{task['taskId']}", headers=A)
        kept = await client.get(f"/v1/tasks/{mine['taskId']}", headers=B)
        assert kept.status_code == 200
        assert kept.json()["error"]["code"] == "cancelled"
        assert len((await client.get("/v1/tasks", headers=A)).json()["tasks"]) == 3


async def test_drain_answers_open_long_polls_with_the_current_state(api: Any) -> None:
    client, broker = api
    submitted = asyncio.create_task(
        client.post("/v1/tasks?wait=300", json={"code": "return 1"}, headers=A)
    )
    await until(lambda: broker.recent("tenant-a", 1))
    task_id = broker.recent("tenant-a", 1)[0].task_id
    polled = asyncio.create_task(client.get(f"/v1/tasks/{task_id}?wait=300", headers=A))
    await asyncio.sleep(0.05)
    assert not submitted.done()
    assert not polled.done()
    broker.drain()
    # a hang guard, far below the 300 s asked for: drain must wake both
    answers = await asyncio.wait_for(asyncio.gather(submitted, polled), timeout=30)
    for answer in answers:
        assert answer.status_code == 202
        assert answer.json()["taskId"] == task_id
        assert answer.json()["status"] == "queued"
    # and a wait asked for while closing is not waited
    late = await asyncio.wait_for(
        client.get(f"/v1/tasks/{task_id}?wait=300", headers=A), timeout=30
    )
    assert late.status_code == 202


async def test_shutdown_with_an_open_long_poll_keeps_the_graceful_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configs: list[uvicorn.Config] = []
    real_config = uvicorn.Config

    def recording_config(*args: Any, **kwargs: Any) -> uvicorn.Config:
        config = real_config(*args, **kwargs)
        configs.append(config)
        return config

    monkeypatch.setattr(server_module.uvicorn, "Config", recording_config)
    settings = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1.5)

    async def serve_and_stop() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            async with running_broker(settings, auth_token="secret-auth-token") as running:
                poll = asyncio.create_task(
                    client.post(f"{running.url}/v1/tasks?wait=300", json={"code": "return 1"})
                )
                await until(lambda: running.broker.recent("default", 1))
            return await poll

    answer = await asyncio.wait_for(serve_and_stop(), timeout=60)  # hang guard only
    assert answer.status_code == 202
    assert answer.json()["status"] == "queued"
    assert [c.timeout_graceful_shutdown for c in configs] == [2]


async def test_an_exception_while_handling_a_frame_does_not_drop_the_runner(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1)
    async with running_broker(settings, auth_token="secret-auth-token") as running:
        broker = running.broker
        handle = broker.runner_message

        def faulty(connection: Any, message: Any) -> None:
            if isinstance(message, TaskOffer):
                raise RuntimeError("a bug in the broker")
            handle(connection, message)

        monkeypatch.setattr(broker, "runner_message", faulty)
        async with httpx.AsyncClient(base_url=running.url) as client:
            grant = await client.post("/runners/auth", json={"token": "secret-auth-token"})
        ws_url = running.url.replace("http://", "ws://") + "/runners/_ws?id=r1"
        headers = {"Authorization": f"Bearer {grant.json()['data']['token']}"}
        async with ws_connect(ws_url, additional_headers=headers) as socket:

            async def receive_type() -> str:
                frame = await asyncio.wait_for(socket.recv(), timeout=30)  # hang guard
                return str(json.loads(frame)["type"])

            assert await receive_type() == "broker:inforequest"
            await socket.send(encode(RunnerInfo()))
            assert await receive_type() == "broker:runnerregistered"
            await socket.send(encode(TaskOffer(offer_id="o1", valid_for=5000)))
            await socket.send(encode(TaskOffer(offer_id="o2", valid_for=5000)))
            await socket.send(encode(RunnerInfo()))  # still served on the same connection
            assert await receive_type() == "broker:runnerregistered"
            assert broker.runner_ids() == ["r1"]
    failures = [r for r in caplog.records if "frame ignored" in r.getMessage()]
    assert [r.getMessage() for r in failures] == [
        "handling TaskOffer from runner r1 failed; frame ignored"
    ] * 2
    assert all(r.exc_info is not None for r in failures)


async def test_drain_keeps_long_polls_of_a_running_task_until_it_ends(api: Any) -> None:
    from runner.protocol.messages import RunnerInfo, TaskAccepted, TaskOffer

    client, broker = api

    runner = FakeRunner("r-drain")
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
    submitted = asyncio.create_task(
        client.post("/v1/tasks?wait=300", json={"code": "return [1]"}, headers=A)
    )
    await until(lambda: any(type(m).__name__ == "TaskOfferAccept" for m in runner.sent))
    accept = next(m for m in runner.sent if type(m).__name__ == "TaskOfferAccept")
    broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
    broker.drain()
    await asyncio.sleep(0.05)
    # Running on a runner: it may still finish within the drain, so the poll waits...
    assert not submitted.done()
    broker.runner_message(runner, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=[1])))
    answer = await asyncio.wait_for(submitted, timeout=30)  # a hang guard
    # ... and gets the result, not a 202 that would send the client round in a loop.
    assert answer.status_code == 200
    assert answer.json()["result"] == [1]


# --- the edge: what a hostile caller sends ------------------------------------------


def send_whole_body(port: int, size: int, *, chunked: bool) -> tuple[int | None, str]:
    """POST ``size`` bytes the way urllib does (all of it, then read; ``Connection:
    close``) over a real socket: (status or None on a reset, the response's text)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\n{framing}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(head.encode())
            piece = b"x" * 65536
            for start in range(0, size, len(piece)):
                data = piece[: min(len(piece), size - start)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None, "connection reset"
    status_line, _, rest = answer.decode().partition("\r\n")
    return int(status_line.split()[1]), rest.partition("\r\n\r\n")[2]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_body_gets_a_413_the_client_can_read(chunked: bool) -> None:
    # A real server: the reset this is about happens at the socket, which the ASGI
    # transport has not got.
    limit = 256 * 1024
    settings = Settings(
        broker_host="127.0.0.1",
        broker_port=0,
        max_request_bytes=limit,
        graceful_shutdown_timeout_s=1,
    )
    async with running_broker(settings, auth_token="secret-auth-token") as running:
        status, text = await asyncio.to_thread(
            send_whole_body, running.port, 3 * limit, chunked=chunked
        )
        assert status == 413, text  # b3a21b2: "connection reset"
        assert (status, json.loads(text)) == (
            413,
            {"detail": f"Request body exceeds the limit of {limit} bytes "
             "(SANDBOX_MAX_REQUEST_BYTES)"},
        )  # fmt: skip
        # and it keeps serving
        async with httpx.AsyncClient(base_url=running.url) as client:
            ok = await client.post("/v1/tasks", json={"code": "return 1"})
            assert ok.status_code == 202


async def test_a_runner_message_over_the_limit_closes_that_runner_with_1009() -> None:
    settings = Settings(
        broker_host="127.0.0.1", broker_port=0, max_payload=64 * 1024, graceful_shutdown_timeout_s=1
    )
    async with running_broker(settings, auth_token="secret-auth-token") as running:

        async def connect(runner_id: str) -> Any:
            async with httpx.AsyncClient(base_url=running.url) as client:
                grant = await client.post("/runners/auth", json={"token": "secret-auth-token"})
            return ws_connect(
                running.url.replace("http://", "ws://") + f"/runners/_ws?id={runner_id}",
                additional_headers={"Authorization": f"Bearer {grant.json()['data']['token']}"},
                max_size=None,
            )

        async def register(socket: Any) -> None:
            assert json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] == (
                "broker:inforequest"
            )
            await socket.send(encode(RunnerInfo()))
            assert json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] == (
                "broker:runnerregistered"
            )

        async with await connect("big") as big, await connect("other") as other:
            await register(big)
            await register(other)
            await big.send(json.dumps({"type": "runner:taskoffer", "pad": "x" * 100_000}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(big.recv(), 30)  # hang guard
            assert big.close_code == 1009
            assert "exceeds limit of 65536 bytes" in (big.close_reason or "")
            await until(lambda: running.broker.runner_ids() == ["other"])
            # The endpoint and the other runner are unaffected.
            await other.send(encode(RunnerInfo()))
            assert json.loads(await asyncio.wait_for(other.recv(), 30))["type"] == (
                "broker:runnerregistered"
            )
            async with await connect("again") as again:
                await register(again)


def app_with_metrics(api_keys: dict[str, str], client: tuple[str, int]) -> httpx.AsyncClient:
    registry = CollectorRegistry()
    app = create_app(
        BrokerDriver(Broker(BrokerConfig(), metrics=BrokerMetrics(registry))),
        GrantTokens(30),
        ApiConfig(
            auth_token="secret-auth-token",
            api_keys=api_keys,
            max_request_bytes=64 * 1024,
            ceilings=TaskLimits(),
        ),
        registry=registry,
    )
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://broker")


async def test_health_and_metrics_need_a_key_when_keys_are_set() -> None:
    async with app_with_metrics(KEYS, ("203.0.113.9", 5000)) as client:
        for path in ("/v1/health", "/metrics"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"Authorization": "Bearer no"})).status_code == (
                401
            )
            assert (await client.get(path, headers=A)).status_code == 200, path
        assert (await client.get("/v1/health", headers=B)).json()["runners"] == []
        assert "sandbox_broker_runners" in (await client.get("/metrics", headers=B)).text
        assert (await client.get("/healthz")).json() == {"status": "ok"}  # liveness: open
    # Without keys, as the rest of the API: loopback only.
    async with app_with_metrics({}, ("203.0.113.9", 5000)) as remote:
        assert (await remote.get("/v1/health")).status_code == 403
        assert (await remote.get("/metrics")).status_code == 403
        assert (await remote.get("/healthz")).status_code == 200
    async with app_with_metrics({}, ("127.0.0.1", 5000)) as local:
        assert (await local.get("/v1/health")).status_code == 200
        assert (await local.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {"code": "x", "query": _nested(1, "q", 300)},
            "query nests deeper than 128 levels (the broker's limit)",
        ),
        (
            {"code": "x", "items": [{"json": _nested(1, "q", 200)}]},
            "items nests deeper than 128 levels in an item",
        ),
        (
            {"code": "x", "items": [{"a": _nested([], "q", 129)}]},
            "items nests deeper than 128 levels in an item",
        ),
    ],
    ids=["query-300", "item-200", "plain-item-130"],
)
async def test_input_too_deep_to_travel_is_a_422_at_submission(
    api: Any, body: dict[str, Any], fragment: str
) -> None:
    client, broker = api
    response = await client.post("/v1/tasks", json=body, headers=A)
    assert response.status_code == 422
    assert fragment in response.json()["detail"]
    assert broker.recent("tenant-a", 10) == []


async def test_input_at_the_depth_limit_is_accepted(api: Any) -> None:
    client, _ = api
    body = {"code": "x", "query": _nested(1, "q", 128), "items": [_nested(1, "i", 128)]}
    assert (await client.post("/v1/tasks", json=body, headers=A)).status_code == 202


async def test_nan_in_items_is_a_422_at_submission(api: Any) -> None:
    client, _ = api
    response = await client.post(
        "/v1/tasks",
        content=b'{"code": "x", "items": [{"a": NaN}]}',  # Python's parser takes it
        headers={**A, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "NaN and Infinity are not JSON" in response.json()["detail"]


async def test_the_ceiling_message_names_the_limit_and_where_it_came_from() -> None:
    bundle = str(Path("policies/sandbox.toml"))
    sources = {
        "memoryMb": LimitSource("SANDBOX_MEMORY_MB", True, "limits.memory_mb", bundle, 2048),
        "cpus": LimitSource("SANDBOX_CPUS", False, "limits.cpus", bundle, 4.0),
    }
    app = create_app(
        BrokerDriver(Broker(BrokerConfig())),
        GrantTokens(30),
        ApiConfig(
            auth_token="t",
            api_keys=KEYS,
            max_request_bytes=64 * 1024,
            ceilings=TaskLimits(timeout_s=60, memory_mb=256, cpus=1.0),
            ceiling_sources=sources,
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        memory = await client.post("/v1/tasks", json={"code": "x", "memoryMb": 300}, headers=A)
        cpus = await client.post("/v1/tasks", json={"code": "x", "cpus": 2}, headers=A)
        timeout = await client.post(
            "/v1/tasks", json={"code": "x", "timeoutSeconds": 90}, headers=A
        )
    assert memory.status_code == cpus.status_code == timeout.status_code == 422
    assert memory.json()["detail"] == (
        "memoryMb 300 exceeds 256 MiB, this broker's per-task limit "
        "(SANDBOX_MEMORY_MB; the policy bundle's ceiling is 2048)"
    )
    assert cpus.json()["detail"] == (
        "cpus 2 exceeds 1 CPUs, this broker's per-task limit (the policy bundle's default, "
        f"limits.cpus in {bundle}; the operator may raise it up to the bundle's ceiling "
        "of 4 with SANDBOX_CPUS)"
    )
    assert timeout.json()["detail"] == (
        "timeoutSeconds 90 exceeds 60 s, this broker's per-task limit"
    )


@pytest.mark.parametrize("memory_mb", [None, 200], ids=["bundle-default", "setting"])
async def test_a_running_broker_names_its_real_limit_source(memory_mb: int | None) -> None:
    settings = Settings(
        broker_host="127.0.0.1",
        broker_port=0,
        memory_mb=memory_mb,
        graceful_shutdown_timeout_s=1,
    )
    bounds = load_policy(settings).bundle.config.limits.memory_mb
    limit = memory_mb or bounds.default
    async with (
        running_broker(settings, auth_token="secret-auth-token") as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        refused = await client.post("/v1/tasks", json={"code": "x", "memoryMb": limit + 1})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert detail.startswith(
        f"memoryMb {limit + 1} exceeds {limit} MiB, this broker's per-task limit ("
    )
    if memory_mb is None:
        assert f"the policy bundle's default, limits.memory_mb in {settings.policy_dir}" in detail
        assert f"ceiling of {bounds.ceiling} with SANDBOX_MEMORY_MB" in detail
    else:
        assert detail.endswith(
            f"(SANDBOX_MEMORY_MB; the policy bundle's ceiling is {bounds.ceiling})"
        )


async def test_byte_budgets_through_the_api_413_alone_429_together() -> None:
    client, broker = make(
        max_request_bytes=4 * 1024 * 1024,
        config=BrokerConfig(max_queued_bytes_per_tenant=1024 * 1024),
    )
    items = [{"v": "x" * 1000} for _ in range(400)]  # ~400 KB
    async with client:
        for _ in range(2):
            accepted = await client.post("/v1/tasks", json={"code": "x", "items": items}, headers=A)
            assert accepted.status_code == 202
        full = await client.post("/v1/tasks", json={"code": "x", "items": items}, headers=A)
        assert full.status_code == 429
        assert "SANDBOX_TENANT_QUEUED_BYTES" in full.json()["detail"]
        assert full.headers["retry-after"] == "1"
        # another tenant is served
        other = await client.post("/v1/tasks", json={"code": "x", "items": items}, headers=B)
        assert other.status_code == 202
        big = await client.post(
            "/v1/tasks", json={"code": "x", "items": [*items, *items, *items]}, headers=B
        )
        assert big.status_code == 413
        assert "more than the 1048576 bytes a tenant may have queued" in big.json()["detail"]
    assert len(broker.recent("tenant-a", 10)) == 2


def test_the_runner_names_its_per_task_limit_too() -> None:
    service = SimpleNamespace(pipeline=SimpleNamespace(limits=Limits(memory_bytes=256 * MIB)))
    with pytest.raises(LimitAboveCeiling) as refused:
        RunnerService.limits_for(service, TaskLimitsRequest(memory_mb=300))  # type: ignore[arg-type]
    assert str(refused.value) == (
        "memoryMb 300 exceeds 256, this runner's per-task limit "
        "(SANDBOX_MEMORY_MB, or the policy bundle's default when unset)"
    )


async def test_a_long_poll_does_not_keep_the_parsed_request_alive() -> None:
    # A long-poll used to wait inside the endpoint, with FastAPI holding the parsed
    # body (json.loads and the model: ~100 times the body for small items) for up to
    # 300 s. Now what stays is the task as JSON text, counted in the tenant's budget.
    settings = Settings(broker_host="127.0.0.1", broker_port=0, graceful_shutdown_timeout_s=1)
    body = json.dumps({"code": "return 1", "items": [{}] * 200_000}).encode()
    async with (
        running_broker(settings, auth_token="secret-auth-token") as running,
        httpx.AsyncClient(base_url=running.url, timeout=60) as client,
    ):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            poll = asyncio.create_task(
                client.post(
                    "/v1/tasks?wait=300",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            )
            await until(lambda: running.broker.recent("default", 1))
            await asyncio.sleep(0.2)  # the endpoint has returned; the answer waits
            assert not poll.done()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        (task,) = running.broker.recent("default", 1)
        running.broker.drain()
        answer = await asyncio.wait_for(poll, 30)  # hang guard
    assert answer.status_code == 202
    assert answer.headers["location"] == f"/v1/tasks/{task.task_id}"
    # {"json":{}} per {} item: the task's text is 3 times the body here (b3a21b2 held
    # ~40 times it while the poll waited).
    assert held < 4 * len(body) + 2 * 1024 * 1024, (held, len(body))


async def test_code_above_the_runners_code_bytes_is_a_422_before_it_queues() -> None:
    """The runner would refuse it before parsing (code_too_large); the API says so at
    once, with the same text, and nothing is queued."""
    broker = Broker(BrokerConfig())
    app = create_app(
        BrokerDriver(broker),
        GrantTokens(30),
        ApiConfig(
            auth_token="t",
            api_keys=KEYS,
            max_request_bytes=1024 * 1024,
            ceilings=TaskLimits(timeout_s=60, memory_mb=256, cpus=1.0),
            max_code_bytes=1000,
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        big = await client.post("/v1/tasks", json={"code": "x" * 999 + "é"}, headers=A)
        fits = await client.post("/v1/tasks", json={"code": "x" * 1000}, headers=A)
    assert big.status_code == 422
    assert big.json()["detail"] == (
        "Task code is 1,001 bytes, above the limit of 1,000 bytes (limits.code_bytes)"
    )
    assert fits.status_code == 202
    assert broker.state()["queued_tasks"] == 1
