"""The broker's task store: the seam's two implementations, and a broker restarted on one.

A restart here is what a SIGKILL leaves: the store closed (the kernel closes a dead
process's files and drops its lock) with nothing flushed by the broker, then a new
:class:`Broker` on the same file. Every step is committed when the core makes it, so
there is nothing a graceful stop would add. The real process, killed with SIGKILL,
is tests/integration/test_broker_restart.py.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes import FakeClock, advance, connect

from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.server import open_store
from runner.broker_server.sqlite_store import SCHEMA_VERSION, SqliteStore
from runner.broker_server.store import (
    SQLITE_FILE_NAME,
    MemoryStore,
    StoredTask,
    TaskStore,
    parse_store,
)
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import BrokerTask, TaskStatus, parse_wire_id, wire_id
from runner.cli import main
from runner.errors import IdempotencyKeyReused, InfrastructureError, TenantBacklogFull
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.messages import (
    TaskAccepted,
    TaskCancel,
    TaskDone,
    TaskDoneData,
    TaskOffer,
    TaskOfferAccept,
    TaskSettingsMessage,
)
from runner.sandbox.base import Mode
from runner.settings import Settings

Reopen = Callable[[], TaskStore]


def submission(tenant: str = "t", code: str = "return 1", **kw: Any) -> Submission:
    return Submission(tenant=tenant, code=code, items=[], mode=Mode.ALL_ITEMS, **kw)


def stored(task_id: str, **kw: Any) -> StoredTask:
    return StoredTask(
        task_id=task_id,
        tenant=kw.pop("tenant", "t"),
        mode=Mode.PER_ITEM,
        limits=TaskLimits(timeout_s=5, memory_mb=64, cpus=0.5),
        submitted_wall=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        settings=kw.pop("settings", '{"code":"return 1"}'),
        output_schema=kw.pop("output_schema", '{"type":"integer"}'),
        **kw,
    )


@pytest.fixture(params=["memory", "sqlite"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Reopen]:
    """The store as a new broker process finds it (the last one's closed first)."""
    opened: list[TaskStore] = []

    def again() -> TaskStore:
        if opened:
            opened[-1].close()
        path = tmp_path / "state" / SQLITE_FILE_NAME
        store: TaskStore = MemoryStore() if request.param == "memory" else SqliteStore(path)
        opened.append(store)
        return store

    yield again
    if opened:
        opened[-1].close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / SQLITE_FILE_NAME


def restart(store_path: Path, previous: Broker | None = None, **config: Any) -> Broker:
    """A new broker on the file (a FakeClock, its own metrics), the previous one's store
    closed as its process's death would."""
    if previous is not None:
        previous.store.close()
    return Broker(
        BrokerConfig(**config),
        clock=FakeClock(),
        metrics=BrokerMetrics(CollectorRegistry()),
        store=SqliteStore(store_path),
    )


def kept(broker: Broker, task_id: str) -> BrokerTask:
    task = broker.get(task_id)
    assert task is not None, f"the broker does not know {task_id}"
    return task


def metric(broker: Broker, name: str, **labels: str) -> float:
    value = broker._metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# -- the seam: both implementations --------------------------------------------------


def test_each_step_of_a_task_is_taken_by_either_store(reopen: Reopen) -> None:
    store = reopen()
    store.add(stored("a"))
    store.lease("a", 1, "r1", running=False)
    store.requeue("a", 1)
    store.lease("a", 1, "r1", running=True)
    assert store.finish("a", 1, "success", '{"status":"success"}') is True
    store.forget(["a"])
    store.forget([])


def test_a_broker_runs_a_task_the_same_over_either_store(reopen: Reopen) -> None:
    broker = Broker(BrokerConfig(), store=reopen())
    runner = connect(broker, offers=1)
    task = broker.submit(submission(code="return 42"))
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=42)))
    assert task.document == {"status": "success", "result": 42, "prints": [], "audit": None}
    assert [t.task_id for t in broker.recent("t", 10)] == [task.task_id]


def test_memory_keeps_nothing_beyond_the_process() -> None:
    store = MemoryStore()
    store.add(stored("a"))
    assert (store.is_durable, MemoryStore().recover().unfinished) == (False, [])
    broker = Broker(BrokerConfig(), store=store)
    task = broker.submit(submission())
    assert Broker(BrokerConfig(), store=MemoryStore()).get(task.task_id) is None  # as before


def test_sqlite_gives_back_every_task_as_it_was(sqlite_path: Path) -> None:
    stores = [SqliteStore(sqlite_path)]

    def reopen() -> TaskStore:
        stores[-1].close()
        stores.append(SqliteStore(sqlite_path))
        return stores[-1]

    store = stores[0]
    store.add(stored("queued", idempotency_key="k1", fingerprint="f1"))
    store.add(stored("offered"))
    store.add(stored("running", tenant="u"))
    store.add(stored("done"))
    store.lease("offered", 1, "r1", running=False)
    store.lease("running", 1, "r2", running=True)
    store.lease("done", 1, "r1", running=True)
    assert store.finish("done", 1, "success", '{"status":"success","result":1}')

    recovered = reopen().recover()
    assert [t.task_id for t in recovered.unfinished] == ["queued", "offered", "running"]
    assert recovered.requeued == 2
    queued, offered, running = recovered.unfinished
    assert queued == stored("queued", idempotency_key="k1", fingerprint="f1")
    # Each lease of the broker that died is over: back in the queue, next attempt.
    assert (offered.status, offered.attempt, offered.runner_id) == ("queued", 2, None)
    assert (running.status, running.attempt, running.tenant) == ("queued", 2, "u")
    assert running.settings == '{"code":"return 1"}'  # dispatched again from these
    (done,) = recovered.finished
    assert (done.status, done.document_json) == ("success", '{"status":"success","result":1}')
    assert (done.settings, done.output_schema) == (None, None)
    # A second start finds no lease to end: attempts move once per dead lease.
    assert reopen().recover().requeued == 0
    stores[-1].close()


# -- sqlite: the file ----------------------------------------------------------------------


def test_a_result_of_an_older_attempt_is_not_written(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    store.add(stored("a"))
    store.lease("a", 1, "r1", running=True)
    store.close()
    store = SqliteStore(sqlite_path)
    store.recover()  # attempt 2 now
    assert store.finish("a", 1, "success", "{}") is False
    assert store.finish("a", 2, "success", "{}") is True
    assert store.finish("a", 2, "error", "{}") is False  # once
    store.close()


def test_one_broker_per_file(sqlite_path: Path) -> None:
    first = SqliteStore(sqlite_path)
    with pytest.raises(InfrastructureError) as refused:
        SqliteStore(sqlite_path)
    assert f"Another broker uses the task store {sqlite_path} (pid {os.getpid()})" in str(
        refused.value
    )
    first.close()
    SqliteStore(sqlite_path).close()  # the lock goes with its holder


def test_the_file_is_the_brokers_alone_and_in_wal_mode(sqlite_path: Path) -> None:
    SqliteStore(sqlite_path).close()
    assert stat.S_IMODE(sqlite_path.stat().st_mode) == 0o600  # tenants' code and data
    assert stat.S_IMODE(sqlite_path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(sqlite_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_of_another_schema_version_is_refused(sqlite_path: Path) -> None:
    SqliteStore(sqlite_path).close()
    with sqlite3.connect(sqlite_path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(InfrastructureError, match="schema version 99"):
        SqliteStore(sqlite_path)
    with sqlite3.connect(sqlite_path) as db:
        db.execute("PRAGMA user_version = 1")
    SqliteStore(sqlite_path).close()  # the refusal released the lock


def test_a_place_that_cannot_hold_the_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InfrastructureError, match="Cannot create the broker's task store"):
        SqliteStore(tmp_path / "a-file" / SQLITE_FILE_NAME)


def test_a_store_that_cannot_be_made_names_the_setting_to_change(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InfrastructureError) as refused:
        SqliteStore(tmp_path / "a-file" / SQLITE_FILE_NAME)
    hint = refused.value.hint or ""
    assert "SANDBOX_BROKER_STORE=sqlite:////" in hint
    assert f"uid {os.geteuid()} can write" in hint
    assert "SANDBOX_BROKER_STORE=memory" in hint


def test_a_store_file_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    # A directory where the file should be: the lock beside it is made, the file is
    # not (as a file of another user, or on a read-only mount, would not be).
    (tmp_path / SQLITE_FILE_NAME).mkdir()
    with pytest.raises(InfrastructureError) as refused:
        SqliteStore(tmp_path / SQLITE_FILE_NAME)
    assert str(refused.value).startswith(
        f"Cannot create the broker's task store {tmp_path / SQLITE_FILE_NAME}"
    )
    assert "SANDBOX_BROKER_STORE=sqlite:////" in (refused.value.hint or "")
    (tmp_path / SQLITE_FILE_NAME).rmdir()
    SqliteStore(tmp_path / SQLITE_FILE_NAME).close()  # the refusal released the lock


@pytest.mark.parametrize(
    ("value", "kind", "path"),
    [
        ("memory", "memory", None),
        ("sqlite", "sqlite", None),
        ("sqlite:///tasks.db", "sqlite", Path("tasks.db")),
        ("sqlite:////var/lib/b/tasks.db", "sqlite", Path("/var/lib/b/tasks.db")),
        ("redis://redis:6379/0", "redis", None),
    ],
)
def test_the_setting_names_a_store(value: str, kind: str, path: Path | None) -> None:
    spec = parse_store(Settings(broker_store=value).broker_store)
    assert (spec.kind, spec.path) == (kind, path)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("redis:///0", "names no Redis host"),
        ("sqlite:///", "must be memory, sqlite, sqlite:///PATH or redis://HOST:PORT/DB"),
        ("postgres://x", "must be memory, sqlite, sqlite:///PATH or redis://HOST:PORT/DB"),
    ],
)
def test_a_store_the_broker_cannot_open_is_refused_with_the_setting_named(
    value: str, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        Settings(broker_store=value)


def test_sqlite_alone_is_a_file_in_the_state_directory(tmp_path: Path) -> None:
    store = open_store(Settings(broker_store="sqlite", state_dir=tmp_path))
    assert store.location == str(tmp_path / SQLITE_FILE_NAME)
    store.close()
    assert isinstance(open_store(Settings(broker_store="memory")), MemoryStore)


@pytest.mark.usefixtures("clean_env")
def test_the_default_store_is_the_sqlite_file_in_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SANDBOX_BROKER_STORE")  # the test's own (tests/conftest.py)
    settings = Settings(state_dir=tmp_path)  # not the machine's state directory
    assert settings.broker_store == "sqlite"
    store = open_store(settings)
    assert isinstance(store, SqliteStore)
    assert store.location == str(tmp_path / SQLITE_FILE_NAME)
    store.close()


# -- a broker restarted on its store -------------------------------------------------------


def test_queued_tasks_survive_and_go_to_a_runner_that_connects_afterwards(
    sqlite_path: Path,
) -> None:
    first = restart(sqlite_path)
    tasks = [first.submit(submission(code=f"return {n}")) for n in range(3)]
    second = restart(sqlite_path, first)
    assert [kept(second, t.task_id).status for t in tasks] == [TaskStatus.QUEUED] * 3
    runner = connect(second, offers=3)
    accepts = runner.of(TaskOfferAccept)
    assert [a.task_id for a in accepts] == [t.task_id for t in tasks]  # attempt 1, in order
    for accept in accepts:
        second.runner_message(runner, TaskAccepted(task_id=accept.task_id))
    codes = [s.settings["code"] for s in runner.of(TaskSettingsMessage)]
    assert codes == ["return 0", "return 1", "return 2"]


def test_a_finished_result_survives_as_it_was_kept(sqlite_path: Path) -> None:
    first = restart(sqlite_path)
    runner = connect(first, offers=1)
    task = first.submit(submission())
    first.runner_message(runner, TaskAccepted(task_id=task.task_id))
    first.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=7)))
    document = task.document_json
    second = restart(sqlite_path, first)
    again = kept(second, task.task_id)
    assert (again.status, again.document_json) == (TaskStatus.SUCCESS, document)
    assert second.summary(again)["submittedAt"] == first.summary(task)["submittedAt"]


def test_a_running_task_comes_back_at_its_next_attempt_and_the_old_result_is_dropped(
    sqlite_path: Path,
) -> None:
    first = restart(sqlite_path)
    old_runner = connect(first, offers=1)
    task = first.submit(submission(code="return 'first'"))
    first.runner_message(old_runner, TaskAccepted(task_id=task.task_id))
    assert task.status is TaskStatus.RUNNING

    second = restart(sqlite_path, first)
    again = kept(second, task.task_id)
    assert (again.status, again.attempt) == (TaskStatus.QUEUED, 2)
    assert metric(second, "sandbox_broker_requeues_total", cause="broker_restart") == 1
    # The old runner, still running attempt 1, reconnects and reports it: dropped.
    back = connect(second, old_runner.runner_id)
    second.runner_message(back, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    assert again.status is TaskStatus.QUEUED
    assert metric(second, "sandbox_broker_stale_results_total") == 1
    # Attempt 2 goes out under its own id; its result is the task's.
    second.runner_message(back, TaskOffer(offer_id="o", valid_for=5000))
    (accept,) = back.of(TaskOfferAccept)
    assert accept.task_id == f"{task.task_id}.2" == wire_id(task.task_id, 2)
    second.runner_message(back, TaskAccepted(task_id=accept.task_id))
    (settings,) = back.of(TaskSettingsMessage)
    assert (settings.task_id, settings.settings["code"]) == (accept.task_id, "return 'first'")
    second.runner_message(back, TaskDone(task_id=accept.task_id, data=TaskDoneData(result=2)))
    assert again.document is not None
    assert again.document["result"] == 2
    # A late result of attempt 1 after that is still an old attempt's: dropped, counted.
    second.runner_message(back, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    assert again.document["result"] == 2
    assert metric(second, "sandbox_broker_stale_results_total") == 2
    third = restart(sqlite_path, second)
    assert kept(third, task.task_id).document == again.document


def test_an_offered_task_comes_back_and_a_late_acceptance_of_it_is_cancelled(
    sqlite_path: Path,
) -> None:
    first = restart(sqlite_path)
    runner = connect(first, offers=1)
    task = first.submit(submission())
    assert task.status is TaskStatus.OFFERED
    second = restart(sqlite_path, first)
    back = connect(second, runner.runner_id)
    second.runner_message(back, TaskAccepted(task_id=task.task_id))  # attempt 1's offer
    (cancel,) = back.of(TaskCancel)
    assert cancel.task_id == task.task_id
    assert kept(second, task.task_id).status is TaskStatus.QUEUED
    assert back.of(TaskSettingsMessage) == []


def test_a_cancel_and_a_queue_timeout_after_a_restart_are_kept(sqlite_path: Path) -> None:
    first = restart(sqlite_path, queue_timeout_s=30)
    cancelled, expiring = first.submit(submission()), first.submit(submission())
    second = restart(sqlite_path, first, queue_timeout_s=30)
    second.cancel(kept(second, cancelled.task_id))
    clock = second.clock
    assert isinstance(clock, FakeClock)
    advance(second, clock, 29)
    assert kept(second, expiring.task_id).status is TaskStatus.QUEUED
    advance(second, clock, 2)  # the queue timeout starts again at the restart
    third = restart(sqlite_path, second)
    codes = [
        (kept(third, task.task_id).document or {})["error"]["code"]
        for task in (cancelled, expiring)
    ]
    assert codes == ["cancelled", "queue_timeout"]


def test_tenants_counts_are_recounted_from_the_tasks(sqlite_path: Path) -> None:
    first = restart(sqlite_path, max_unfinished_per_tenant=2)
    first.submit(submission("a"))
    first.submit(submission("a"))
    second = restart(sqlite_path, first, max_unfinished_per_tenant=2)
    with pytest.raises(TenantBacklogFull):
        second.submit(submission("a"))
    second.submit(submission("b"))  # another tenant's budget is its own


def test_queued_bytes_are_recounted_from_the_tasks(sqlite_path: Path) -> None:
    mib = 1024 * 1024
    first = restart(sqlite_path, max_queued_bytes_per_tenant=mib)
    first.submit(submission(code="x" * (mib // 2)))
    second = restart(sqlite_path, first, max_queued_bytes_per_tenant=mib)
    with pytest.raises(TenantBacklogFull, match="bytes of unfinished tasks"):
        second.submit(submission(code="y" * (mib // 2)))


def test_retention_forgets_in_the_store_as_in_memory(sqlite_path: Path) -> None:
    first = restart(sqlite_path, max_tasks_kept=2)
    runner = connect(first)
    tasks = []
    for n in range(3):
        task = first.submit(submission(), idempotency=(f"key-{n}", "fp"))
        first.runner_message(runner, TaskOffer(offer_id=f"o{n}", valid_for=5000))
        first.runner_message(runner, TaskAccepted(task_id=task.task_id))
        first.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=n)))
        tasks.append(task)
    assert first.get(tasks[0].task_id) is None
    second = restart(sqlite_path, first, max_tasks_kept=2)
    assert [second.get(t.task_id) is not None for t in tasks] == [False, True, True]
    with sqlite3.connect(sqlite_path) as db:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2
    # An evicted task's key is free again; a kept one's still names its task.
    assert second.submit(submission(), idempotency=("key-0", "fp")).task_id != tasks[0].task_id
    assert second.submit(submission(), idempotency=("key-2", "fp")).task_id == tasks[2].task_id


def test_a_lower_retention_after_a_restart_applies_to_what_was_kept(sqlite_path: Path) -> None:
    first = restart(sqlite_path)
    runner = connect(first)
    for n in range(3):
        task = first.submit(submission())
        first.runner_message(runner, TaskOffer(offer_id=f"o{n}", valid_for=5000))
        first.runner_message(runner, TaskAccepted(task_id=task.task_id))
        first.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=n)))
    second = restart(sqlite_path, first, max_tasks_kept=1)
    assert [t.document["result"] for t in second.recent("t", 10)] == [2]  # type: ignore[index]


# -- idempotency keys ----------------------------------------------------------------------


def test_a_key_names_one_task_per_tenant(reopen: Reopen) -> None:
    broker = Broker(BrokerConfig(), store=reopen())
    task = broker.submit(submission("a"), idempotency=("k", "fp"))
    assert broker.submit(submission("a"), idempotency=("k", "fp")) is task
    assert broker.replay("a", "k", "fp") is task
    other = broker.submit(submission("b"), idempotency=("k", "fp"))
    assert other.task_id != task.task_id
    with pytest.raises(IdempotencyKeyReused, match=f"used for task {task.task_id}"):
        broker.submit(submission("a", code="return 2"), idempotency=("k", "another"))
    assert len(broker.recent("a", 10)) == 1


def test_a_key_survives_a_restart_on_sqlite(sqlite_path: Path) -> None:
    first = restart(sqlite_path)
    task = first.submit(submission(), idempotency=("k", "fp"))
    second = restart(sqlite_path, first)
    again = second.replay("t", "k", "fp")
    assert again is not None
    assert again.task_id == task.task_id
    with pytest.raises(IdempotencyKeyReused):
        second.replay("t", "k", "other")


def test_a_task_the_store_cannot_keep_is_not_taken() -> None:
    class FullDisk(MemoryStore):
        is_full = True

        def add(self, task: StoredTask) -> None:
            if self.is_full:
                raise InfrastructureError("disk full")

    store = FullDisk()
    broker = Broker(BrokerConfig(max_unfinished_per_tenant=1), store=store)
    with pytest.raises(InfrastructureError):
        broker.submit(submission())
    assert broker.recent("t", 10) == []
    store.is_full = False
    broker.submit(submission())  # the refused one took no room in its tenant's count


def test_a_step_the_store_fails_to_record_is_counted_and_the_broker_goes_on() -> None:
    class Flaky(MemoryStore):
        def lease(self, task_id: str, attempt: int, runner_id: str, *, running: bool) -> None:
            raise InfrastructureError("I/O error")

    registry = CollectorRegistry()
    broker = Broker(BrokerConfig(), metrics=BrokerMetrics(registry), store=Flaky())
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    assert task.status is TaskStatus.SUCCESS
    assert registry.get_sample_value("sandbox_broker_store_errors_total") == 2


def test_wire_ids_name_the_attempt() -> None:
    assert wire_id("abc", 1) == "abc"
    assert parse_wire_id("abc") == ("abc", 1)
    assert parse_wire_id("abc.3") == ("abc", 3)
    assert parse_wire_id("abc.x") == ("abc.x", 1)  # not ours: unknown, as any id
    assert parse_wire_id("abc.1") == ("abc.1", 1)  # attempt 1 never has a suffix


def test_up_with_a_store_it_cannot_make_says_so_in_one_line_before_docker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `up` opens its store before its runner's image, self-check and pool: no Docker
    # is touched here (this is a unit test), and the operator reads the setting to fix.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SANDBOX_BROKER_STORE", f"sqlite:///{tmp_path}/a-file/tasks.sqlite3")
    result = CliRunner().invoke(main, ["up", "--port", "0"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(
        f"sandbox-runner: error: Cannot create the broker's task store in {tmp_path}/a-file ("
    )
    assert "SANDBOX_BROKER_STORE=sqlite:////" in lines[0]
    assert "Traceback" not in result.output
