"""The broker core's own cost per task, for each task store: ``python -m bench.broker_store``.

One task at a time through the sans-I/O core with a fake runner that answers at once
(submit, offer, accept, result): no HTTP, no WebSocket, no container. What is left is
the core's rules and the store's writes, so the difference between the lines is the
store. ``sqlite`` is the store as shipped (two fsyncs per task: the submission and the
running lease); ``sqlite, NORMAL only`` and ``sqlite, FULL always`` are the two plain
policies, for comparison. The SQLite file is in ``--dir`` (default ``/var/tmp``: a
disk, not a tmpfs, or fsync would cost nothing). ``redis`` is the store several
brokers share, on a ``redis-server`` the run starts on loopback (no persistence: the
steps' round trips and Lua scripts, not Redis's own fsync policy); the task comes
before the runner's offer, so it is claimed from the shared queue, as a broker's
cluster link claims it for a runner's offer (a busy broker's case: a broker whose
runner already has a slot on offer holds its own submission at once, a step less).
``make bench`` reports memory, SQLite as shipped and Redis (:func:`dispatch`, one line
under the table); nothing is asserted. An fsync's cost depends on the disk
and on whoever else is writing: run it a few times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.redis_store import RedisStore
from runner.broker_server.sqlite_store import SqliteStore
from runner.broker_server.store import MemoryStore, SharedStore, TaskStore
from runner.broker_server.submission import Submission, prepare
from runner.protocol.messages import (
    RunnerInfo,
    TaskAccepted,
    TaskDone,
    TaskDoneData,
    TaskOffer,
)
from runner.sandbox.base import Mode
from runner.testing import RedisServer


class _Runner:
    """A runner connection that drops what it is sent."""

    runner_id = "bench-runner"

    def send(self, message: Any) -> None:
        pass

    def send_frame(self, frame: str) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


def _forced(durable: bool) -> type[SqliteStore]:
    """The SQLite store with every step committed with (or without) an fsync."""
    shipped = SqliteStore._transaction

    class Forced(SqliteStore):
        @staticmethod
        @contextlib.contextmanager
        def _transaction(db: Any, *, durable: bool = False) -> Iterator[None]:
            with shipped(db, durable=forced):
                yield

    forced = durable
    return Forced


def measure(store: TaskStore, tasks: int) -> tuple[float, float]:
    """Tasks per second through the core, and the median milliseconds of one."""
    broker = Broker(
        BrokerConfig(max_tasks_kept=tasks, max_unfinished_per_tenant=tasks), store=store
    )
    runner = _Runner()
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    prepared = prepare(
        Submission(tenant="t", code="return 1", items=[{"n": 1}], mode=Mode.ALL_ITEMS)
    )
    each = []
    start = time.perf_counter()
    shared = cast(SharedStore, store) if store.is_shared else None
    for n in range(tasks):
        began = time.perf_counter()
        task = broker.submit(prepared)
        broker.runner_message(runner, TaskOffer(offer_id=f"o{n}", valid_for=5000))
        if shared is not None:  # the cluster link's claim for the offer
            broker.adopt(shared.claim(broker.spare(), broker.at_quota()))
        broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
        broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
        each.append(time.perf_counter() - began)
    total = time.perf_counter() - start
    broker.close()
    return tasks / total, statistics.median(each) * 1000


def dispatch(tasks: int = 1000, directory: Path = Path("/var/tmp")) -> dict[str, Any]:  # noqa: S108
    """``make bench``'s broker line: tasks/s and p50 ms per task through the core, on the
    memory store and on SQLite as shipped (a file on ``directory``'s disk)."""
    found: dict[str, Any] = {"tasks": tasks}
    for name, make in (("memory", lambda path: MemoryStore()), ("sqlite", SqliteStore)):
        with tempfile.TemporaryDirectory(dir=directory) as made:
            rate, p50 = measure(make(Path(made) / "tasks.sqlite3"), tasks)
        found[name] = {"tasksPerS": round(rate, 1), "p50Ms": round(p50, 3)}
    with tempfile.TemporaryDirectory(dir=directory) as made:
        rate, p50 = measure(_redis(Path(made), tasks), tasks)
    found["redis"] = {"tasksPerS": round(rate, 1), "p50Ms": round(p50, 3)}
    return found


def _redis(directory: Path, tasks: int) -> TaskStore:
    """A Redis store on a redis-server of the run's own (stopped when the store closes)."""
    server = RedisServer(directory).__enter__()
    store = RedisStore(server.url, broker_id="bench")  # (limits: the bench core's config)
    close = store.close

    def close_both() -> None:
        close()
        server.__exit__()

    store.close = close_both  # type: ignore[method-assign]
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    # A disk, not a tmpfs; the run makes its own directory in it (mkdtemp, 0700).
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))  # noqa: S108
    args = parser.parse_args()
    stores: list[tuple[str, Callable[[Path], TaskStore]]] = [
        ("memory", lambda path: MemoryStore()),
        ("sqlite (as shipped)", SqliteStore),
        ("sqlite, NORMAL only", _forced(False)),
        ("sqlite, FULL always", _forced(True)),
        ("redis (loopback)", lambda path: _redis(path, args.tasks)),
    ]
    print(f"{'store':22} {'tasks/s':>9} {'p50 ms/task':>12}")
    for name, make in stores:
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            rate, p50 = measure(make(Path(directory) / "tasks.sqlite3"), args.tasks)
        print(f"{name:22} {rate:9.0f} {p50:12.3f}")


if __name__ == "__main__":
    main()
