"""Several broker cores on one real Redis (``SANDBOX_BROKER_STORE=redis://``): the
shared queue, leases, reclaim, fencing, take-over, admission, idempotency, retention.

Each core here is driven as the event loop's :class:`ClusterLink` drives it, by hand
(:func:`pump`: claim from the shared queue for the core's spare slots), with fake
runners and a fake clock; a broker "dies" by no longer renewing its lease (its Redis
key expired at once with :func:`lapse`). The channels and the loop itself run in
tests/integration/test_broker_redis.py (real processes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fakes import FakeClock, FakeRunner, connect
from helpers import until

from runner.broker_server.app import ApiConfig, create_app
from runner.broker_server.cluster import ClusterLink
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.redis_store import PREFIX, RedisStore
from runner.broker_server.retry import RetryPolicy
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import TaskStatus
from runner.broker_server.tokens import GrantTokens
from runner.errors import InfrastructureError, TaskTooLarge, TenantBacklogFull
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.messages import (
    TaskAccepted,
    TaskAck,
    TaskCancel,
    TaskDone,
    TaskDoneData,
    TaskOffer,
    TaskOfferAccept,
)
from runner.sandbox.base import ErrorCode, Mode


def submission(tenant: str = "t", code: str = "return 1", **kw: Any) -> Submission:
    return Submission(tenant=tenant, code=code, items=[], mode=Mode.ALL_ITEMS, **kw)


class Node:
    """One broker: its core, its store (its own connection to the shared Redis), its
    metrics."""

    def __init__(
        self,
        url: str,
        name: str,
        clock: FakeClock,
        config: BrokerConfig | None = None,
    ) -> None:
        self.store = RedisStore(url, broker_id=name, lease_s=5)
        self.registry = CollectorRegistry()
        self.broker = Broker(
            config or BrokerConfig(), clock, metrics=BrokerMetrics(self.registry), store=self.store
        )

    def pump(self) -> int:
        """Claim for the spare slots, as the cluster link does; how many were claimed."""
        claimed = self.store.claim(self.broker.spare(), self.broker.at_quota())
        if claimed:
            self.broker.adopt(claimed)
        return len(claimed)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def nodes(redis_url: str) -> Iterator[tuple[Node, Node, FakeClock]]:
    clock = FakeClock()
    a, b = Node(redis_url, "a", clock), Node(redis_url, "b", clock)
    yield a, b, clock
    for node in (a, b):
        node.store.close()


def lapse(redis_url: str, name: str) -> None:
    """Broker ``name``'s lease ran out (it died, or was cut off from Redis)."""
    redis.Redis.from_url(redis_url).delete(f"{PREFIX}alive:{name}")


def run(node: Node, runner: FakeRunner) -> list[str]:
    """Accept every offer acceptance the runner has not answered yet: wire ids."""
    ids = []
    for accept in runner.of(TaskOfferAccept):
        task = node.broker.get(accept.task_id.partition(".")[0])
        if task is not None and task.status is TaskStatus.OFFERED and accept.task_id not in ids:
            node.broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
            ids.append(accept.task_id)
    return ids


def done(node: Node, runner: FakeRunner, wire: str, result: Any = 1) -> None:
    node.broker.runner_message(runner, TaskDone(task_id=wire, data=TaskDoneData(result=result)))


def test_a_task_submitted_to_one_broker_runs_on_the_others_runner_and_both_read_it(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    runner = connect(b.broker, "rb", offers=1)
    task = a.broker.submit(submission(code="return 42"))
    assert a.pump() == 0  # a has no runner: nothing to claim for
    assert b.pump() == 1
    (wire,) = run(b, runner)
    assert b.broker.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    assert a.broker.get(task.task_id).runner_id == "rb"  # type: ignore[union-attr]
    done(b, runner, wire, 42)
    for node in (a, b):
        seen = node.broker.get(task.task_id)
        assert seen is not None
        assert seen.status is TaskStatus.SUCCESS
        assert seen.document == {"status": "success", "result": 42, "prints": [], "audit": None}
    assert a.broker.refresh(task)
    assert task.document_json is not None
    assert [t.task_id for t in a.broker.recent("t", 10)] == [task.task_id]


def test_a_claim_takes_one_task_per_tenant_in_turn(nodes: tuple[Node, Node, FakeClock]) -> None:
    a, _, _ = nodes
    for _ in range(3):
        a.broker.submit(submission(tenant="busy"))
    a.broker.submit(submission(tenant="quiet"))
    claimed = a.store.claim(2)
    assert sorted(t.tenant for t in claimed) == ["busy", "quiet"]


def test_a_dead_brokers_tasks_are_reclaimed_running_ones_at_their_next_attempt(
    redis_url: str, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "ra", offers=1)
    running = a.broker.submit(submission())
    assert a.pump() == 0  # held at once: a had a free slot, nothing waited
    (wire,) = run(a, ra)
    ra.sent.clear()
    a.broker.runner_message(ra, TaskOffer(offer_id="more", valid_for=60_000))
    queued = a.broker.submit(submission())
    a.pump()
    assert a.broker.get(queued.task_id).status is TaskStatus.OFFERED  # type: ignore[union-attr]
    # a dies: its lease lapses; b reclaims at its next renewal.
    lapse(redis_url, "a")
    # (The offered one was only offered: no settings had left, the same attempt.)
    assert b.store.reclaim() == (1, 1, 1)
    rb = connect(b.broker, "rb", offers=2)
    assert b.pump() == 2
    wires = sorted(run(b, rb))
    assert wires == sorted([f"{running.task_id}.2", queued.task_id])
    for w in wires:
        done(b, rb, w, "b")
    # a's runner, back (through a's old connection here), reports attempt 1: stale.
    done(a, ra, wire, "a")
    for task in (running, queued):
        seen = b.broker.get(task.task_id)
        assert seen is not None
        assert seen.document is not None
        assert seen.document["result"] == "b"
    assert a.metric("sandbox_broker_stale_results_total") == 1


def test_a_result_of_a_stale_attempt_is_dropped_and_counted(
    redis_url: str, nodes: tuple[Node, Node, FakeClock]
) -> None:
    """Forced: broker a is cut off longer than its lease while its runner runs the
    task; b reclaims it and runs attempt 2; a's runner then reports attempt 1 to a,
    which still holds it: the store refuses it (the fence), a counts it and shows the
    store's result, not the one it refused."""
    a, b, _ = nodes
    ra = connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission())
    a.pump()
    (wire,) = run(a, ra)
    held = a.broker.get(task.task_id)
    lapse(redis_url, "a")
    b.store.reclaim()
    rb = connect(b.broker, "rb", offers=1)
    b.pump()
    (wire2,) = run(b, rb)
    done(b, rb, wire2, "attempt 2")
    done(a, ra, wire, "attempt 1")  # a still holds attempt 1: its result is refused
    assert a.metric("sandbox_broker_stale_results_total") == 1
    assert held is not None
    assert held.document is not None
    assert held.document["result"] == "attempt 2"
    seen = a.broker.get(task.task_id)
    assert seen is not None
    assert seen.document is not None
    assert seen.document["result"] == "attempt 2"


def test_a_runner_whose_broker_died_reports_to_another_which_takes_the_task_over(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "r1", offers=1)
    task = a.broker.submit(submission())
    a.pump()
    (wire,) = run(a, ra)
    # a dies (not yet reclaimed); the runner reconnects to b and re-sends its result.
    again = connect(b.broker, "r1")
    done(b, again, wire, "kept")
    seen = b.broker.get(task.task_id)
    assert seen is not None
    assert seen.document is not None
    assert seen.document["result"] == "kept"
    assert b.metric("sandbox_broker_stale_results_total") == 0
    # Its copy, re-sent once more, changes nothing.
    done(b, again, wire, "copy")
    assert b.broker.get(task.task_id).document["result"] == "kept"  # type: ignore[union-attr]


def test_a_broker_cut_off_past_its_lease_lets_its_tasks_go(
    redis_url: str, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "ra")
    task = a.broker.submit(submission())
    a.broker.runner_message(ra, TaskOffer(offer_id="o", valid_for=60_000))
    a.pump()
    (accept,) = ra.of(TaskOfferAccept)
    lapse(redis_url, "a")
    b.store.reclaim()
    a.broker.runner_message(ra, TaskAccepted(task_id=accept.task_id))
    assert ra.sent[-1].__class__.__name__ == "TaskCancel"  # no settings: not a's any more
    assert a.broker.is_held(task) is False
    assert a.broker.get(task.task_id).status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_a_task_handed_back_goes_to_the_shared_queue(nodes: tuple[Node, Node, FakeClock]) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission())
    a.pump()
    a.broker.runner_disconnected(ra)  # offered, not accepted: back to the queue
    rb = connect(b.broker, "rb", offers=1)
    assert b.pump() == 1
    assert run(b, rb) == [task.task_id]  # same attempt: no settings had left


def test_retry_policy_across_brokers(nodes: tuple[Node, Node, FakeClock]) -> None:
    a, b, clock = nodes
    ra = connect(a.broker, "ra", offers=1)
    # (A claimed task's back-off counts from its failure's wall-clock time, which the
    # fake clock does not move: a short one, waited out for real.)
    policy = RetryPolicy(max_attempts=2, initial_delay_s=0.05)
    task = a.broker.submit(submission(retry=policy))
    a.pump()
    run(a, ra)
    a.broker.runner_disconnected(ra)
    clock.now += 31  # the runner-lost grace
    a.broker.tick(clock())
    clock.now += 1  # the back-off: due, handed to the shared queue
    a.broker.tick(clock())
    time.sleep(0.06)
    rb = connect(b.broker, "rb", offers=1)
    b.pump()
    assert run(b, rb) == [f"{task.task_id}.2"]
    done(b, rb, f"{task.task_id}.2", "second")
    seen = a.broker.get(task.task_id)
    assert seen is not None
    assert seen.document is not None
    assert seen.document["result"] == "second"
    assert [e["error"]["code"] for e in seen.attempts_json()] == [ErrorCode.RUNNER_LOST]


def test_admission_counts_a_tenants_tasks_across_brokers(redis_url: str) -> None:
    clock = FakeClock()
    config = BrokerConfig(max_unfinished_per_tenant=2, max_queued_bytes_per_tenant=10_000)
    a = Node(redis_url, "a", clock, config)
    b = Node(redis_url, "b", clock, config)
    first = a.broker.submit(submission())
    b.broker.submit(submission())
    with pytest.raises(TenantBacklogFull, match="already has 2 unfinished tasks"):
        a.broker.submit(submission())
    with pytest.raises(TaskTooLarge):
        a.broker.submit(submission(code="x = 1\n" * 3000))
    a.broker.submit(submission(tenant="other"))  # another tenant's count
    a.broker.cancel(first)  # in the shared queue: cancelled here, counted out
    assert first.status is TaskStatus.ERROR
    b.broker.submit(submission())
    for node in (a, b):
        node.store.close()


def test_one_idempotency_key_makes_one_task_whichever_broker_is_asked(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    first = a.broker.submit(submission(), idempotency=("k1", "f1"))
    again = b.broker.submit(submission(), idempotency=("k1", "f1"))
    assert again.task_id == first.task_id
    with pytest.raises(Exception, match="different request"):
        b.broker.submit(submission(), idempotency=("k1", "other"))


def test_a_cancel_asked_of_another_broker_reaches_the_one_holding_the_task(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    rb = connect(b.broker, "rb", offers=1)
    task = a.broker.submit(submission())
    b.pump()
    run(b, rb)
    view = a.broker.get(task.task_id)
    assert view is not None
    assert not a.broker.is_held(view)
    a.broker.cancel(view)  # published; b's link hands it to b's core:
    b.broker.cancel_requested(task.task_id)
    assert a.broker.refresh(view)
    assert view.document is not None
    assert view.document["error"]["code"] == ErrorCode.CANCELLED


def test_retention_is_per_tenant_across_brokers(redis_url: str) -> None:
    clock = FakeClock()
    a = Node(redis_url, "a", clock, BrokerConfig(max_tasks_kept=2))
    runner = connect(a.broker, "ra")
    ids = []
    for n in range(3):
        a.broker.runner_message(runner, TaskOffer(offer_id=f"o{n}", valid_for=60_000))
        ids.append(a.broker.submit(submission()).task_id)
        a.pump()
        (wire,) = run(a, runner)
        done(a, runner, wire, n)
    assert a.broker.get(ids[0]) is None  # the oldest result forgotten
    assert [t.task_id for t in a.broker.recent("t", 10)] == [ids[2], ids[1]]
    keys = redis.Redis.from_url(redis_url).keys(f"{PREFIX}task:*")
    assert len(keys) == 2
    a.store.close()


def test_closing_a_broker_hands_its_tasks_back(nodes: tuple[Node, Node, FakeClock]) -> None:
    a, b, _ = nodes
    connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission())
    a.pump()
    a.store.close()
    rb = connect(b.broker, "rb", offers=1)
    assert b.pump() == 1
    assert run(b, rb) == [task.task_id]  # only offered (no settings had left): same attempt


def test_the_store_keeps_no_settings_of_a_finished_task(
    redis_url: str, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, _, _ = nodes
    runner = connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission(code="return 'secret'"))
    a.pump()
    (wire,) = run(a, runner)
    done(a, runner, wire)
    rec = redis.Redis.from_url(redis_url).hget(f"{PREFIX}task:{task.task_id}", "rec")
    assert rec is not None
    assert json.loads(rec)["settings"] is None


def test_a_result_the_store_failed_to_take_is_kept_unacknowledged_and_written_again(
    monkeypatch: pytest.MonkeyPatch, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, b, _ = nodes
    runner = connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission())
    a.pump()
    (wire,) = run(a, runner)

    def unreachable(*args: Any, **kwargs: Any) -> bool:
        raise InfrastructureError("The broker's Redis task store failed to keep a result")

    with monkeypatch.context() as patch:
        patch.setattr(a.store, "finish", unreachable)
        a.broker.runner_message(
            runner, TaskDone(task_id=wire, data=TaskDoneData(result=7), sandbox={"ack": True})
        )
        assert runner.of(TaskAck) == []  # the runner keeps it (and re-sends it)
        held = a.broker.get(task.task_id)
        assert held is not None
        assert held.document is not None  # served from here meanwhile
        assert a.broker.write_unwritten() is True  # still down: still kept
    assert a.broker.write_unwritten() is False
    seen = b.broker.get(task.task_id)
    assert seen is not None
    assert seen.document == {"status": "success", "result": 7, "prints": [], "audit": None}


async def test_the_api_answers_503_when_the_shared_store_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, _, _ = nodes

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise InfrastructureError("The broker's Redis task store failed to read a task")

    monkeypatch.setattr(a.store, "load", unreachable)
    driver = BrokerDriver(a.broker)
    app = create_app(
        driver,
        GrantTokens(30),
        ApiConfig(
            auth_token="t", api_keys={}, max_request_bytes=65536, ceilings=TaskLimits(timeout_s=60)
        ),
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as http:
            response = await http.get("/v1/tasks/abc")
    finally:
        await driver.aclose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"].startswith("The broker's task store is unavailable")


def test_a_hand_back_the_store_missed_is_given_back_at_the_next_renewal(
    monkeypatch: pytest.MonkeyPatch, nodes: tuple[Node, Node, FakeClock]
) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "ra", offers=1)
    task = a.broker.submit(submission())
    a.pump()

    def unreachable(*args: Any, **kwargs: Any) -> bool:
        raise InfrastructureError("The broker's Redis task store failed to requeue a task")

    with monkeypatch.context() as patch:
        patch.setattr(a.store, "requeue", unreachable)
        a.broker.runner_disconnected(ra)  # offered: handed back, but the store missed it
    # Let go here; Redis still has it as a's (queued: an offer is not recorded there).
    assert a.broker.is_held(a.broker.get(task.task_id)) is False  # type: ignore[arg-type]
    rb = connect(b.broker, "rb", offers=1)
    assert b.pump() == 0  # nobody can claim it: the store has it as a's
    assert a.store.give_back_orphans(a.broker.held_ids()) == 1
    assert a.store.give_back_orphans(a.broker.held_ids()) == 0
    assert b.pump() == 1
    assert run(b, rb) == [task.task_id]  # it had only been offered: the same attempt


def test_a_task_in_the_shared_queue_never_says_no_runner(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    """A broker without runners answers for a task the others' runners will take: its
    own lack of runners is no reason (a client that fails fast on ``no_runner`` would
    cancel a task that is about to run)."""
    a, _, _ = nodes
    task = a.broker.submit(submission())
    waiting = a.broker.waiting(task)
    assert waiting is not None
    assert waiting.reason.value == "runners_busy"
    assert "shared queue" in waiting.message


def test_a_claim_skips_a_tenant_at_its_quota_here_for_the_others_to_run(
    redis_url: str,
) -> None:
    clock = FakeClock()
    a = Node(redis_url, "a", clock, BrokerConfig(tenant_quota=1))
    b = Node(redis_url, "b", clock, BrokerConfig(tenant_quota=1))
    ra = connect(a.broker, "ra", offers=3)
    a.broker.submit(submission(tenant="busy"))
    run(a, ra)  # busy has its quota (1) running on a (held at once: a had a free slot)
    a.broker.submit(submission(tenant="busy"))
    other = a.broker.submit(submission(tenant="other"))
    assert a.broker.at_quota() == {"busy"}
    assert a.pump() == 1  # other's task only: busy's second waits for b (or a slot of its own)
    assert a.broker.get(other.task_id).status is TaskStatus.OFFERED  # type: ignore[union-attr]
    connect(b.broker, "rb", offers=1)
    assert b.pump() == 1  # b takes busy's second task
    for node in (a, b):
        node.store.close()


def test_recent_tasks_are_in_submission_order_even_within_one_millisecond(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    ids = [(a if n % 2 else b).broker.submit(submission()).task_id for n in range(30)]
    assert [t.task_id for t in a.broker.recent("t", 30)] == ids[::-1]


async def test_the_cluster_links_claim_pass_cancels_on_and_wake_waiters_elsewhere(
    redis_url: str,
) -> None:
    """The event-loop side, two brokers in one loop: b's link claims a task submitted
    to a (the ``ready`` channel), a cancel asked of a reaches b (``cancel``), and a's
    long-poll on its snapshot ends when b finishes it (``done``)."""
    a = Node(redis_url, "a", FakeClock())
    b = Node(redis_url, "b", FakeClock())
    drivers = [BrokerDriver(node.broker) for node in (a, b)]
    links = [
        asyncio.create_task(
            ClusterLink(driver, node.store, BrokerMetrics(CollectorRegistry())).run()
        )
        for driver, node in zip(drivers, (a, b), strict=True)
    ]
    try:
        runner = connect(b.broker, "rb", offers=1)
        await asyncio.sleep(0.2)  # the links subscribed
        task = a.broker.submit(submission())
        await until(lambda: runner.of(TaskOfferAccept), 5, "b to claim and offer the task")
        b.broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
        waiter = asyncio.ensure_future(drivers[0].wait_finished(task, 10))
        a.broker.cancel(task)
        assert await waiter is True
        assert task.document is not None
        assert task.document["error"]["code"] == ErrorCode.CANCELLED
        assert runner.of(TaskCancel)  # b told its runner
    finally:
        for link in links:
            link.cancel()
        await asyncio.gather(*links, return_exceptions=True)
        for driver in drivers:
            await driver.aclose()
        for node in (a, b):
            node.store.close()


def test_a_broker_with_a_free_slot_holds_its_submission_at_once_unless_others_wait(
    nodes: tuple[Node, Node, FakeClock],
) -> None:
    a, b, _ = nodes
    ra = connect(a.broker, "ra", offers=1)
    first = a.broker.submit(submission())
    assert a.broker.is_held(first)  # no claim round: offered at once
    assert [x.task_id for x in ra.of(TaskOfferAccept)] == [first.task_id]
    waiting = b.broker.submit(submission(tenant="early"))  # b has no runner: queued
    a.broker.runner_message(ra, TaskOffer(offer_id="more", valid_for=60_000))
    late = a.broker.submit(submission(tenant="late"))
    assert not a.broker.is_held(late)  # a task waited in the shared queue: not passed over
    assert a.pump() == 1
    assert a.broker.get(waiting.task_id).status is TaskStatus.OFFERED  # type: ignore[union-attr]
