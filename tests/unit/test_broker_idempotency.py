"""``Idempotency-Key`` on ``POST /v1/tasks``: a client that lost its answer retries safely.

Same key and tenant: the same task, answered as a new submission would be (202 with
its state, or 200 with its result) plus ``Idempotent-Replayed: true``; another
tenant's same key is another task; the same key with another request is a 422. On a
SQLite store the key holds across a restart of the broker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import connect

from runner.broker_server.app import ApiConfig, create_app
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.sqlite_store import SqliteStore
from runner.broker_server.store import MemoryStore, StoredTask, TaskStore
from runner.broker_server.submission import TaskLimits
from runner.broker_server.tokens import GrantTokens
from runner.errors import InfrastructureError
from runner.protocol.messages import TaskAccepted, TaskDone, TaskDoneData, TaskOfferAccept

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
TASK = {"code": "return 1", "items": [{"n": 1}]}


def client_of(broker: Broker) -> httpx.AsyncClient:
    app = create_app(
        BrokerDriver(broker),
        GrantTokens(30),
        ApiConfig(
            auth_token="secret-auth-token",
            api_keys={"key-a": "tenant-a", "key-b": "tenant-b"},
            max_request_bytes=64 * 1024,
            ceilings=TaskLimits(timeout_s=120, memory_mb=512, cpus=2),
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://broker")


@pytest.fixture(params=["memory", "sqlite"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], TaskStore]:
    def make() -> TaskStore:
        if request.param == "memory":
            return MemoryStore()
        return SqliteStore(tmp_path / "tasks.sqlite3")

    return make


def key(value: str) -> dict[str, str]:
    return {**A, "Idempotency-Key": value}


async def post(client: httpx.AsyncClient, body: Any, headers: dict[str, str]) -> httpx.Response:
    return await client.post("/v1/tasks", json=body, headers=headers)


async def test_a_retry_with_the_same_key_gets_the_same_task(
    new_store: Callable[[], TaskStore],
) -> None:
    broker = Broker(BrokerConfig(), store=new_store())
    async with client_of(broker) as client:
        first = await post(client, TASK, key("k-1"))
        retry = await post(client, TASK, key("k-1"))
        plain = await post(client, TASK, A)
    assert (first.status_code, retry.status_code) == (202, 202)
    assert retry.json()["taskId"] == first.json()["taskId"]
    assert retry.headers["location"] == first.headers["location"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert plain.json()["taskId"] != first.json()["taskId"]  # no key: a new task each time
    assert len(broker.recent("tenant-a", 10)) == 2
    broker.close()


async def test_the_same_request_spelled_otherwise_is_the_same_request() -> None:
    broker = Broker(BrokerConfig())
    async with client_of(broker) as client:
        first = await post(client, TASK, key("k"))
        # Keys in another order, and a default spelled out: the same fields.
        spelled = {"items": [{"n": 1}], "mode": "all_items", "code": "return 1"}
        retry = await post(client, spelled, key("k"))
    assert retry.json()["taskId"] == first.json()["taskId"]


async def test_another_tenants_same_key_is_another_task() -> None:
    broker = Broker(BrokerConfig())
    async with client_of(broker) as client:
        mine = await post(client, TASK, key("shared"))
        theirs = await post(client, TASK, {**B, "Idempotency-Key": "shared"})
        # Nor can tenant B read A's task through the key.
        assert (
            await client.get(f"/v1/tasks/{mine.json()['taskId']}", headers=B)
        ).status_code == 404
    assert theirs.status_code == 202
    assert theirs.json()["taskId"] != mine.json()["taskId"]
    assert "idempotent-replayed" not in theirs.headers


async def test_the_same_key_with_another_request_is_refused_and_changes_nothing() -> None:
    broker = Broker(BrokerConfig())
    async with client_of(broker) as client:
        first = await post(client, TASK, key("k"))
        other = await post(client, {**TASK, "code": "return 2"}, key("k"))
    assert other.status_code == 422
    detail = other.json()["detail"]
    assert detail == (
        f"Idempotency-Key 'k' was used for task {first.json()['taskId']} with a different "
        "request; a retry must send the same request (or use a new key)"
    )
    assert len(broker.recent("tenant-a", 10)) == 1


@pytest.mark.parametrize(
    "value", [b"", b"x" * 256, b"has space", b"caf\xe9"], ids=["empty", "long", "space", "latin-1"]
)
async def test_a_malformed_key_is_a_422_naming_the_header(value: bytes) -> None:
    broker = Broker(BrokerConfig())
    headers = [
        (b"authorization", b"Bearer key-a"),
        (b"content-type", b"application/json"),
        (b"idempotency-key", value),
    ]
    async with client_of(broker) as client:
        response = await client.post("/v1/tasks", content=b'{"code": "return 1"}', headers=headers)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert broker.recent("tenant-a", 10) == []


async def test_a_replay_of_a_finished_task_answers_its_result() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    async with client_of(broker) as client:
        first = await post(client, TASK, key("k"))
        (accept,) = runner.of(TaskOfferAccept)
        broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
        broker.runner_message(
            runner, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=[1]))
        )
        retry = await client.post("/v1/tasks?wait=5", json=TASK, headers=key("k"))
    assert first.status_code == 202
    assert retry.status_code == 200
    assert retry.json() == {"status": "success", "result": [1], "prints": [], "audit": None}
    assert retry.headers["location"] == f"/v1/tasks/{accept.task_id}"
    assert retry.headers["idempotent-replayed"] == "true"


async def test_a_key_holds_across_a_restart_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    first_broker = Broker(BrokerConfig(), store=SqliteStore(path))
    async with client_of(first_broker) as client:
        first = await post(client, TASK, key("k"))
    first_broker.store.close()  # as the process's death would
    second_broker = Broker(BrokerConfig(), store=SqliteStore(path))
    async with client_of(second_broker) as client:
        retry = await post(client, TASK, key("k"))
        other = await post(client, {**TASK, "code": "return 2"}, key("k"))
        read = await client.get(first.headers["location"], headers=A)
    assert retry.status_code == 202
    assert retry.json()["taskId"] == first.json()["taskId"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert read.json()["status"] == "queued"
    second_broker.close()


async def test_a_task_the_store_cannot_keep_is_a_503_and_is_not_taken() -> None:
    class FullDisk(MemoryStore):
        def add(self, task: StoredTask) -> None:
            raise InfrastructureError("The broker's task store x failed", hint="disk full")

    broker = Broker(BrokerConfig(), store=FullDisk())
    async with client_of(broker) as client:
        response = await post(client, TASK, key("k"))
        listing = await client.get("/v1/tasks", headers=A)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "detail": "The broker could not keep the task: The broker's task store x failed (disk full)"
    }
    assert listing.json() == {"tasks": []}
