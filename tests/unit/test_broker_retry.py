"""A task's retry policy (opt-in): infrastructure failures tried again after a back-off,
a task's own failures never; a task the policy gives up on is a dead letter.

Fake runners and a fake clock (the back-off is one of the core's deadlines: no sleeps),
over both stores; a restart is the store closed and a new broker on the same file, as
in test_broker_store.py. The HTTP API's side (the field, its 422s, the dead-letter
list) is at the end, through httpx's ASGI transport.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeClock, FakeRunner, advance, connect

from runner.broker_server.app import ApiConfig, TaskCreate, create_app, request_fingerprint
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.retry import (
    RETRYABLE_CODES,
    AttemptError,
    RetryPolicy,
    backoff_left_s,
    retry_on_problem,
)
from runner.broker_server.sqlite_store import SCHEMA_VERSION, SqliteStore
from runner.broker_server.store import MemoryStore, TaskStore
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import BrokerTask, TaskStatus
from runner.broker_server.tokens import GrantTokens
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.messages import (
    TaskAccepted,
    TaskDone,
    TaskDoneData,
    TaskErrorBody,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
    TaskSettingsMessage,
)
from runner.sandbox.base import ErrorCode, Mode

# Every code a task's own run can end with, and the others the allowlist leaves out.
NEVER_RETRIED = sorted({code.value for code in ErrorCode} - RETRYABLE_CODES)
TASKS_OWN = [
    "user_error",
    "timeout",
    "memory_limit_exceeded",
    "security_violation",
    "syntax_error",
    "pids_limit_exceeded",
    "output_limit_exceeded",
    "process_exit",
    "crashed",
    "agent_protocol_error",
    "output_schema_violation",
    "task_error",
    "cancelled",
]


def submission(retry: RetryPolicy | None = None, tenant: str = "t") -> Submission:
    return Submission(tenant=tenant, code="return 1", items=[], mode=Mode.ALL_ITEMS, retry=retry)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    opened: TaskStore = (
        MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "t.sqlite3")
    )
    yield opened
    opened.close()


def broker_on(store: TaskStore, clock: FakeClock, **config: Any) -> Broker:
    config.setdefault("runner_lost_grace_s", 1.0)
    return Broker(
        BrokerConfig(**config), clock=clock, metrics=BrokerMetrics(CollectorRegistry()), store=store
    )


def metric(broker: Broker, name: str, **labels: str) -> float:
    return broker._metrics.registry.get_sample_value(name, labels) or 0.0


def start(broker: Broker, runner: FakeRunner, task: BrokerTask) -> str:
    """The runner takes the task's current attempt: offer, acceptance. Its wire id."""
    broker.runner_message(runner, TaskOffer(offer_id=f"o{len(runner.sent)}", valid_for=5000))
    accept = runner.of(TaskOfferAccept)[-1]
    assert accept.task_id == task.wire_id
    broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
    return str(accept.task_id)


def fail(broker: Broker, runner: FakeRunner, wire: str, code: str) -> None:
    broker.runner_message(
        runner,
        TaskErrorMessage(
            task_id=wire,
            error=TaskErrorBody(message=f"failed: {code}", description="x" * 5000),
            sandbox={"code": code, "stage": "setup"},
        ),
    )


# -- the core ------------------------------------------------------------------------------


def test_a_runner_lost_mid_task_is_retried_after_its_backoff_and_succeeds_on_attempt_2(
    store: TaskStore,
) -> None:
    clock = FakeClock()
    broker = broker_on(store, clock)
    first = connect(broker, "r1")
    task = broker.submit(submission(RetryPolicy(max_attempts=3, initial_delay_s=5)))
    start(broker, first, task)
    broker.runner_disconnected(first)
    advance(broker, clock, 1.0)  # the runner's grace is over: attempt 1 ended runner_lost

    assert (task.status, task.attempt) == (TaskStatus.QUEUED, 2)
    assert [a.code for a in task.attempts] == ["runner_lost"]
    waiting = broker.summary(task)["waitReason"]
    assert waiting["code"] == "retry_backoff"
    assert "Attempt 1 failed (runner_lost)" in waiting["message"]
    assert broker.next_deadline() == clock() + 5  # the back-off, by the fake clock

    second = connect(broker, "r2", offers=1)
    advance(broker, clock, 4.9)
    broker.runner_message(second, TaskOffer(offer_id="fresh", valid_for=5000))
    assert second.of(TaskOfferAccept) == []  # still backing off, though a slot is free
    advance(broker, clock, 0.1)
    (accept,) = second.of(TaskOfferAccept)
    assert accept.task_id == f"{task.task_id}.2"  # the next attempt, fenced
    broker.runner_message(second, TaskAccepted(task_id=accept.task_id))
    (settings,) = second.of(TaskSettingsMessage)
    assert settings.settings["code"] == "return 1"  # kept for the retry
    broker.runner_message(second, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=2)))

    assert task.status is TaskStatus.SUCCESS
    document = task.document
    assert document is not None
    assert (document["status"], document["result"]) == ("success", 2)
    (lost,) = document["attempts"]
    assert (lost["attempt"], lost["error"]["code"]) == (1, "runner_lost")
    assert metric(broker, "sandbox_broker_retries_total", error_code="runner_lost") == 1
    # The first runner comes back with attempt 1's result: stale, dropped, counted.
    back = connect(broker, "r1")
    broker.runner_message(back, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    assert task.document == document
    assert metric(broker, "sandbox_broker_stale_results_total") == 1


def test_a_task_that_keeps_failing_ends_dead_with_every_attempts_error(store: TaskStore) -> None:
    clock = FakeClock()
    broker = broker_on(store, clock, max_unfinished_per_tenant=1)
    runner = connect(broker)
    policy = RetryPolicy(max_attempts=3, initial_delay_s=1, backoff_multiplier=3)
    task = broker.submit(submission(policy))
    for attempt, delay_s in ((1, 1.0), (2, 3.0)):
        fail(broker, runner, start(broker, runner, task), "container_setup_failed")
        assert (task.status, task.attempt) == (TaskStatus.QUEUED, attempt + 1)
        assert broker.next_deadline() == clock() + delay_s
        advance(broker, clock, delay_s)
    fail(broker, runner, start(broker, runner, task), "container_setup_failed")

    assert task.status is TaskStatus.DEAD
    document = task.document
    assert document is not None
    assert document["status"] == "dead"
    assert document["error"]["code"] == "container_setup_failed"
    assert [a["attempt"] for a in document["attempts"]] == [1, 2, 3]
    assert {len(a["error"]["description"]) for a in document["attempts"]} == {2000}  # capped
    assert broker.recent("t", 10, TaskStatus.DEAD) == [task]
    assert broker.recent("t", 10, TaskStatus.ERROR) == []
    assert metric(broker, "sandbox_broker_retries_total", error_code="container_setup_failed") == 2
    assert (
        metric(broker, "sandbox_broker_dead_letters_total", error_code="container_setup_failed")
        == 1
    )
    assert (
        metric(
            broker, "sandbox_broker_tasks_total", status="dead", error_code="container_setup_failed"
        )
        == 1
    )
    assert (task.settings, task.timer) == (None, None)
    broker.submit(submission())  # its tenant's slot is free again


@pytest.mark.parametrize("code", TASKS_OWN)
def test_a_tasks_own_failure_is_never_retried_even_if_its_policy_names_it(code: str) -> None:
    # Built in code, past the API's 422: the core checks the allowlist again.
    policy = RetryPolicy(max_attempts=5, initial_delay_s=0, retry_on=RETRYABLE_CODES | {code})
    clock = FakeClock()
    broker = broker_on(MemoryStore(), clock)
    runner = connect(broker)
    task = broker.submit(submission(policy))
    fail(broker, runner, start(broker, runner, task), code)
    advance(broker, clock, 1)
    assert (task.status, task.attempt) == (TaskStatus.ERROR, 1)
    assert task.document is not None
    assert [a["error"]["code"] for a in task.document["attempts"]] == [code]
    assert metric(broker, "sandbox_broker_retries_total", error_code=code) == 0
    assert retry_on_problem([code]) is not None  # and the API refuses to name it


def test_the_broker_timer_and_a_cancel_are_never_retried() -> None:
    clock = FakeClock()
    broker = broker_on(MemoryStore(), clock, default_timeout_s=1, timeout_grace_s=0)
    runner = connect(broker)
    policy = RetryPolicy(initial_delay_s=0, retry_on=RETRYABLE_CODES | {"timeout", "cancelled"})
    timed_out, cancelled = broker.submit(submission(policy)), broker.submit(submission(policy))
    start(broker, runner, timed_out)
    start(broker, runner, cancelled)
    broker.cancel(cancelled)
    advance(broker, clock, 1.5)
    assert [t.status for t in (timed_out, cancelled)] == [TaskStatus.ERROR] * 2
    assert [(t.document or {})["error"]["code"] for t in (timed_out, cancelled)] == [
        "timeout",
        "cancelled",
    ]


def test_a_failure_its_policy_does_not_name_ends_the_task_as_an_error_not_dead() -> None:
    broker = broker_on(MemoryStore(), FakeClock())
    runner = connect(broker)
    task = broker.submit(submission(RetryPolicy(retry_on=frozenset({"runner_lost"}))))
    fail(broker, runner, start(broker, runner, task), "docker_unavailable")
    assert task.status is TaskStatus.ERROR


def test_a_task_without_a_policy_is_as_it_always_was() -> None:
    clock = FakeClock()
    broker = broker_on(MemoryStore(), clock)
    runner = connect(broker)
    task = broker.submit(submission())
    start(broker, runner, task)
    assert task.settings is None  # dropped once sent, as before
    broker.runner_disconnected(runner)
    advance(broker, clock, 1)
    assert task.document == {
        "status": "error",
        "error": {
            "message": "The runner disconnected while running the task",
            "description": "",
            "code": "runner_lost",
            "stage": "run",
        },
        "prints": [],
        "audit": None,
    }
    assert set(broker.summary(task)) == {
        "taskId",
        "status",
        "mode",
        "submittedAt",
        "runnerId",
        "waitReason",
    }


def test_a_cancel_during_the_backoff_ends_the_task_and_nothing_fires_later() -> None:
    clock = FakeClock()
    broker = broker_on(MemoryStore(), clock)
    runner = connect(broker)
    task = broker.submit(submission(RetryPolicy(initial_delay_s=10)))
    fail(broker, runner, start(broker, runner, task), "docker_unavailable")
    broker.cancel(task)
    assert task.status is TaskStatus.ERROR
    assert broker.next_deadline() is None
    advance(broker, clock, 20)
    assert runner.of(TaskOfferAccept)[-1].task_id == task.task_id  # attempt 1's, no other


# -- a restart ------------------------------------------------------------------------------


def test_a_restart_keeps_retry_state_and_the_rest_of_the_backoff(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    clock = FakeClock()
    first = broker_on(SqliteStore(path), clock)
    runner = connect(first)
    task = first.submit(submission(RetryPolicy(max_attempts=2, initial_delay_s=60)))
    fail(first, runner, start(first, runner, task), "docker_unavailable")
    first.store.close()

    clock = FakeClock()
    second = broker_on(SqliteStore(path), clock)
    again = second.get(task.task_id)
    assert again is not None
    assert (again.status, again.attempt, again.retry) == (TaskStatus.QUEUED, 2, task.retry)
    assert again.attempts == task.attempts
    # The back-off goes on from the failure's wall clock (a few microseconds ago).
    deadline = second.next_deadline()
    assert deadline is not None
    assert 0 < deadline - clock() <= 60
    runner = connect(second, offers=1)
    assert runner.of(TaskOfferAccept) == []
    advance(second, clock, 60)
    fail(second, runner, start(second, runner, again), "docker_unavailable")
    assert again.status is TaskStatus.DEAD
    second.store.close()

    third = broker_on(SqliteStore(path), FakeClock())
    (dead,) = third.recent("t", 10, TaskStatus.DEAD)
    assert [a.attempt for a in dead.attempts] == [1, 2]
    assert dead.document_json == again.document_json
    third.store.close()


def test_a_restart_while_a_retry_runs_reruns_it_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.sqlite3"
    clock = FakeClock()
    first = broker_on(SqliteStore(path), clock)
    runner = connect(first)
    task = first.submit(submission(RetryPolicy(max_attempts=2, initial_delay_s=0)))
    fail(first, runner, start(first, runner, task), "docker_unavailable")
    advance(first, clock, 0)
    start(first, runner, task)  # attempt 2 running when the broker dies
    first.store.close()

    second = broker_on(SqliteStore(path), FakeClock())
    again = second.get(task.task_id)
    assert again is not None
    assert (again.status, again.attempt, len(again.attempts)) == (TaskStatus.QUEUED, 3, 1)
    runner = connect(second)
    fail(second, runner, start(second, runner, again), "docker_unavailable")
    assert again.status is TaskStatus.DEAD  # two attempts failed: the policy's two
    assert [a.attempt for a in again.attempts] == [1, 3]
    second.store.close()


def test_a_version_1_file_is_migrated_and_its_tasks_have_no_policy(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:  # as version 1 made it: no retry columns
        db.execute("ALTER TABLE tasks DROP COLUMN retry")
        db.execute("ALTER TABLE tasks DROP COLUMN attempts")
        db.execute(
            "INSERT INTO tasks (task_id, tenant, mode, submitted_wall, status, attempt, settings)"
            " VALUES ('old', 't', 'all_items', '2026-01-02T03:04:05+00:00', 'queued', 1, '{}')"
        )
        db.execute("PRAGMA user_version = 1")
    store = SqliteStore(path)
    (old,) = store.recover().unfinished
    assert (old.task_id, old.retry, old.attempts) == ("old", None, ())
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_what_is_left_of_a_backoff_counts_from_the_last_failure() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay_s=10, backoff_multiplier=2)
    failed = datetime(2026, 1, 1, tzinfo=UTC)
    one = [AttemptError(1, failed, "runner_lost", "run", "", "")]
    two = [*one, AttemptError(2, failed, "runner_lost", "run", "", "")]
    assert backoff_left_s(policy, one, failed + timedelta(seconds=4)) == 6
    assert backoff_left_s(policy, two, failed + timedelta(seconds=4)) == 16
    assert backoff_left_s(policy, one, failed + timedelta(seconds=11)) == 0
    assert backoff_left_s(policy, one, failed - timedelta(hours=1)) == 10  # clock set back
    assert backoff_left_s(None, one, failed) == 0
    assert [policy.delay_s(n) for n in (1, 2)] == [10, 20]
    assert policy.total_delay_s() == 30


# -- the HTTP API ---------------------------------------------------------------------------

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


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


@pytest.mark.parametrize(
    ("retry", "says"),
    [
        ({"maxAttempts": 0}, "greater than or equal to 1"),
        ({"maxAttempts": 11}, "less than or equal to 10"),
        ({"initialDelayS": -1}, "greater than or equal to 0"),
        ({"initialDelayS": 301}, "less than or equal to 300"),
        ({"backoffMultiplier": 0.5}, "greater than or equal to 1"),
        ({"backoffMultiplier": 11}, "less than or equal to 10"),
        ({"retryOn": ["user_error"]}, "not user_error: a task's own failure is never retried"),
        ({"retryOn": ["runner_lost", "nonsense"]}, "may name only infrastructure outcomes"),
        ({"retryOn": []}, "at least one code"),
        ({"maxTries": 3}, "Extra inputs are not permitted"),
        ({"maxAttempts": 10, "initialDelayS": 1}, "adds up to 511 s, more than this broker's"),
    ],
)
async def test_a_policy_out_of_bounds_is_a_422_that_says_why(
    retry: dict[str, Any], says: str
) -> None:
    async with client_of(Broker(BrokerConfig(queue_timeout_s=300))) as client:
        answer = await client.post(
            "/v1/tasks", json={"code": "return 1", "retry": retry}, headers=A
        )
    assert answer.status_code == 422
    assert says in answer.text
    if retry.get("retryOn"):
        for code in RETRYABLE_CODES:  # the refusal names what may be named
            assert code in answer.text


async def test_a_nan_delay_is_refused() -> None:
    async with client_of(Broker(BrokerConfig())) as client:
        answer = await client.post(
            "/v1/tasks",
            content=b'{"code": "return 1", "retry": {"initialDelayS": NaN}}',
            headers={**A, "Content-Type": "application/json"},
        )
    assert answer.status_code == 422


async def test_dead_letters_are_listed_for_their_tenant_only_with_their_attempts() -> None:
    clock = FakeClock()
    broker = broker_on(MemoryStore(), clock)
    runner = connect(broker)
    async with client_of(broker) as client:
        retry = {"maxAttempts": 2, "initialDelayS": 0, "retryOn": ["docker_unavailable"]}
        submitted = await client.post(
            "/v1/tasks", json={"code": "return 1", "retry": retry}, headers=A
        )
        assert submitted.status_code == 202
        state = submitted.json()
        assert (state["attempt"], state["attempts"]) == (1, [])
        task = broker.get(state["taskId"])
        assert task is not None
        assert task.retry == RetryPolicy(2, 0, 2.0, frozenset({"docker_unavailable"}))
        plain = (await client.post("/v1/tasks", json={"code": "return 1"}, headers=A)).json()
        fail(broker, runner, start(broker, runner, task), "docker_unavailable")
        advance(broker, clock, 0)
        fail(broker, runner, start(broker, runner, task), "docker_unavailable")

        dead = (await client.get("/v1/tasks?status=dead", headers=A)).json()["tasks"]
        assert [(t["taskId"], t["status"], t["attempt"]) for t in dead] == [
            (task.task_id, "dead", 2)
        ]
        assert [a["error"]["code"] for a in dead[0]["attempts"]] == ["docker_unavailable"] * 2
        assert (await client.get("/v1/tasks?status=dead", headers=B)).json()["tasks"] == []
        document = (await client.get(f"/v1/tasks/{task.task_id}", headers=A)).json()
        assert (document["status"], len(document["attempts"])) == ("dead", 2)
        # A task without a policy is listed as it always was: no attempt fields.
        (queued,) = (await client.get("/v1/tasks?status=queued", headers=A)).json()["tasks"]
        assert queued["taskId"] == plain["taskId"]
        assert set(queued) == {"taskId", "status", "mode", "submittedAt", "runnerId", "waitReason"}
        assert "attempts" not in plain
        bad = await client.get("/v1/tasks?status=buried", headers=A)
        assert bad.status_code == 422


def test_a_request_without_retry_has_the_fingerprint_it_always_had() -> None:
    body = TaskCreate.model_validate({"code": "return 1"})
    fields = body.model_dump(mode="json", by_alias=True)
    del fields["retry"]  # what the body was before the field existed
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    assert request_fingerprint(body) == hashlib.sha256(canonical.encode("ascii")).hexdigest()
    with_retry = TaskCreate.model_validate({"code": "return 1", "retry": {}})
    assert request_fingerprint(body) != request_fingerprint(with_retry)


def test_the_runner_lost_grace_is_a_setting_the_broker_applies(clean_env: None) -> None:
    from runner.broker_server.server import broker_config
    from runner.settings import Settings

    assert broker_config(Settings()).runner_lost_grace_s == 30
    config = broker_config(Settings(runner_lost_grace_s=2))
    clock = FakeClock()
    broker = Broker(config, clock=clock)
    runner = connect(broker, "r1", offers=1)
    task = broker.submit(Submission(tenant="t", code="return 1", items=[], mode=Mode.ALL_ITEMS))
    for accept in runner.of(TaskOfferAccept):
        broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
    broker.runner_disconnected(runner)
    advance(broker, clock, 1.9)
    assert task.status is TaskStatus.RUNNING  # still within the grace
    advance(broker, clock, 0.2)
    assert task.document is not None
    assert task.document["error"]["code"] == "runner_lost"
