"""The embedded broker's HTTP API: auth, tenants, validation, size limits, documents.

No runner is connected here: these are the API's own rules (dispatch with real
runners is tested in tests/integration). Requests go through httpx's ASGI transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from runner.broker_server.app import ApiConfig, create_app
from runner.broker_server.core import Broker, BrokerConfig, TaskLimits
from runner.broker_server.tokens import GrantTokens
from runner.protocol.messages import TaskDone, TaskDoneData

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def make(
    api_keys: dict[str, str] | None = None,
    max_request_bytes: int = 64 * 1024,
    client: tuple[str, int] = ("127.0.0.1", 5000),
) -> tuple[httpx.AsyncClient, Broker]:
    broker = Broker(BrokerConfig(default_timeout_s=60))
    app = create_app(
        broker,
        GrantTokens(30),
        ApiConfig(
            auth_token="secret-auth-token",
            api_keys=api_keys if api_keys is not None else KEYS,
            max_request_bytes=max_request_bytes,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
        ),
    )
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://broker"), broker


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

    class FakeRunner:
        runner_id = "r1"

        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send(self, message: Any) -> None:
            self.sent.append(message)

        def close(self, code: int, reason: str) -> None:
            pass

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


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "code"),
        ({"code": 5}, "code"),
        ({"code": "x", "mode": "sideways"}, "mode"),
        ({"code": "x", "items": [1, 2]}, "items"),
        ({"code": "x", "surprise": True}, "surprise"),
        ({"code": "x", "timeoutSeconds": -1}, "timeoutSeconds"),
        ({"code": "x", "timeoutSeconds": 500}, "exceeds the policy's ceiling of 120"),
        ({"code": "x", "memoryMb": 4096}, "exceeds the policy's ceiling of 512"),
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


async def test_not_json_is_a_4xx(api: Any) -> None:
    client, _ = api
    response = await client.post(
        "/v1/tasks", content=b"{nope", headers={**A, "Content-Type": "application/json"}
    )
    assert response.status_code == 422


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
