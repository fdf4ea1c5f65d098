"""The broker's dispatch rules with fake runners: offers, fairness, quotas, timers."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import tracemalloc
import urllib.request
from typing import Any

import pytest
from fakes import FakeClock, FakeRunner, advance, connect
from helpers import nested_list

from runner.broker_server.core import Broker, BrokerConfig, Draining, TaskFinished
from runner.broker_server.deadlines import Deadlines
from runner.broker_server.schemas import validate_input
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import TaskStatus
from runner.errors import SubmissionRefused, TaskTooLarge, TenantBacklogFull
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.protocol.messages import (
    Drain,
    Rpc,
    RunnerInfo,
    RunnerRegistered,
    TaskAccepted,
    TaskAck,
    TaskCancel,
    TaskDone,
    TaskDoneData,
    TaskErrorBody,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
    TaskRejected,
    TaskSettingsMessage,
)
from runner.sandbox.base import Mode


def submission(tenant: str = "t", code: str = "return 1", **kw: Any) -> Submission:
    return Submission(tenant=tenant, code=code, items=[], mode=Mode.ALL_ITEMS, **kw)


def run_accepted(broker: Broker, runner: FakeRunner) -> list[str]:
    """Accept every offer acceptance the runner got; return the task ids."""
    ids = []
    for accept in runner.of(TaskOfferAccept):
        task = broker.get(accept.task_id)
        if task is not None and task.status is TaskStatus.OFFERED:
            broker.runner_message(runner, TaskAccepted(task_id=accept.task_id))
            ids.append(accept.task_id)
    return ids


def test_registration_is_required_and_answered() -> None:
    broker = Broker(BrokerConfig())
    runner = FakeRunner("r1")
    broker.runner_connected(runner)
    broker.runner_message(runner, TaskOffer(offer_id="o", valid_for=5000))  # before runner:info
    assert type(runner.sent[0]).__name__ == "InfoRequest"
    broker.runner_message(runner, RunnerInfo())
    assert type(runner.sent[-1]).__name__ == "RunnerRegistered"
    assert runner.sent[-1].extensions == ("sandbox-report", "sandbox-prints", "sandbox-ack")
    broker.submit(submission())
    assert runner.of(TaskOfferAccept) == []  # the early offer was ignored


def test_a_task_goes_to_an_offer_then_gets_its_settings() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(
        submission(
            code="return 42",
            limits=TaskLimits(timeout_s=5),
        )
    )
    (accept,) = runner.of(TaskOfferAccept)
    assert (accept.task_id, accept.offer_id) == (task.task_id, "r1-o0")
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    (settings,) = runner.of(TaskSettingsMessage)
    assert settings.settings["code"] == "return 42"
    assert settings.settings["nodeMode"] == "runOnceForAllItems"
    assert settings.settings["limits"] == {"timeoutSeconds": 5}
    broker.runner_message(
        runner, Rpc(call_id="c", task_id=task.task_id, name="logNodeOutput", params=("'hi'",))
    )
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=42)))
    assert task.document == {"status": "success", "result": 42, "prints": [["'hi'"]], "audit": None}


def test_expired_offers_are_not_used_and_the_newest_live_one_is() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(), clock=clock)
    runner = connect(broker)
    broker.runner_message(runner, TaskOffer(offer_id="short", valid_for=1000))
    broker.runner_message(runner, TaskOffer(offer_id="long", valid_for=5000))
    clock.now += 2
    broker.submit(submission())
    assert [a.offer_id for a in runner.of(TaskOfferAccept)] == ["long"]


def test_rejection_requeues_the_task_for_the_next_offer() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    broker.runner_message(runner, TaskRejected(task_id=task.task_id, reason="No open task slots"))
    assert task.status is TaskStatus.QUEUED
    broker.runner_message(runner, TaskOffer(offer_id="again", valid_for=5000))
    assert runner.of(TaskOfferAccept)[-1].offer_id == "again"


def test_no_answer_within_the_accept_timeout_requeues() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(accept_timeout_s=0.05), clock=clock)
    connect(broker, offers=1)
    task = broker.submit(submission())
    assert task.status is TaskStatus.OFFERED
    advance(broker, clock, 0.1)
    assert task.status is TaskStatus.QUEUED


def test_a_busy_tenant_cannot_starve_another() -> None:
    broker = Broker(BrokerConfig(tenant_quota=4, tenant_quotas={"a": 1}))
    runner = connect(broker, offers=0)
    a_tasks = [broker.submit(submission("a")) for _ in range(10)]
    b_task = broker.submit(submission("b"))
    for index in range(3):
        broker.runner_message(runner, TaskOffer(offer_id=f"o{index}", valid_for=5000))
    dispatched = [broker.get(a.task_id) for a in runner.of(TaskOfferAccept)]
    assert [t.tenant for t in dispatched if t] == ["a", "b"]  # a is at its quota of 1
    assert b_task.status is TaskStatus.OFFERED
    assert sum(t.status is TaskStatus.OFFERED for t in a_tasks) == 1


def test_round_robin_across_tenants() -> None:
    broker = Broker(BrokerConfig(tenant_quota=10))
    runner = connect(broker)
    for tenant in ("a", "a", "a", "b", "b", "c"):
        broker.submit(submission(tenant))
    for index in range(6):
        broker.runner_message(runner, TaskOffer(offer_id=f"o{index}", valid_for=5000))
    order = [broker.get(a.task_id).tenant for a in runner.of(TaskOfferAccept)]  # type: ignore[union-attr]
    assert order == ["a", "b", "c", "a", "b", "a"]


def test_broker_side_timeout_cancels_on_the_runner() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(default_timeout_s=0.05, timeout_grace_s=0.0), clock=clock)
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    advance(broker, clock, 0.15)
    assert task.status is TaskStatus.ERROR
    assert task.document is not None
    assert task.document["error"]["message"] == "Task execution timed out"
    assert runner.of(TaskCancel)[-1].reason == "Task execution timed out"
    # a late report of the runner is dropped, not counted twice
    broker.runner_message(
        runner,
        TaskErrorMessage(task_id=task.task_id, error=TaskErrorBody(message="Task was cancelled")),
    )
    assert task.document["error"]["code"] == "timeout"


def test_offered_task_goes_back_to_the_queue_when_its_runner_leaves() -> None:
    broker = Broker(BrokerConfig())
    first = connect(broker, "r1", offers=1)
    task = broker.submit(submission())
    broker.runner_disconnected(first)
    assert task.status is TaskStatus.QUEUED
    second = connect(broker, "r2", offers=1)
    assert second.of(TaskOfferAccept)[0].task_id == task.task_id


def test_running_task_survives_a_reconnect_of_its_runner_and_reports_once() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(runner_lost_grace_s=0.05), clock=clock)
    runner = connect(broker, "r1", offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_disconnected(runner)
    again = connect(broker, "r1")
    advance(broker, clock, 0.1)
    assert task.status is TaskStatus.RUNNING
    broker.runner_message(again, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    broker.runner_message(again, TaskDone(task_id=task.task_id, data=TaskDoneData(result=2)))
    assert task.document is not None
    assert task.document["result"] == 1


def test_running_task_is_failed_when_its_runner_never_returns() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(runner_lost_grace_s=0.05), clock=clock)
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_disconnected(runner)
    advance(broker, clock, 0.1)
    assert task.document is not None
    assert task.document["error"]["code"] == "runner_lost"


def test_output_schema_is_checked_with_the_failing_path() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    schema = {"type": "array", "items": {"type": "object", "required": ["id"]}}
    task = broker.submit(submission(output_schema=schema))
    run_accepted(broker, runner)
    broker.runner_message(
        runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=[{"id": 1}, {}]))
    )
    assert task.document is not None
    assert task.document["error"]["code"] == "output_schema_violation"
    assert task.document["error"]["description"] == "result[1]: 'id' is a required property"


def test_error_report_carries_our_code_and_stage() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_message(
        runner,
        TaskErrorMessage(
            task_id=task.task_id,
            error=TaskErrorBody(message="Security violations detected", description="Line 1: ..."),
            sandbox={
                "code": "security_violation",
                "stage": "analyze",
                "audit": {"taskId": task.task_id},
            },
        ),
    )
    assert task.document == {
        "status": "error",
        "error": {
            "message": "Security violations detected",
            "description": "Line 1: ...",
            "code": "security_violation",
            "stage": "analyze",
        },
        "prints": [],
        "audit": {"taskId": task.task_id},
    }


def test_drain_tells_runners_and_stops_dispatch() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    broker.drain()
    assert runner.of(Drain)
    broker.submit(submission())
    assert runner.of(TaskOfferAccept) == []


def test_a_second_connection_with_the_same_id_replaces_the_first() -> None:
    broker = Broker(BrokerConfig())
    first = connect(broker, "same")
    connect(broker, "same")
    assert first.closed is not None
    assert broker.runner_ids() == ["same"]


def test_queue_timeout_fails_a_task_nobody_takes() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(queue_timeout_s=0.05), clock=clock)
    task = broker.submit(submission())
    advance(broker, clock, 0.1)
    assert task.document is not None
    assert task.document["error"]["code"] == "queue_timeout"


# -- why a queued task waits --------------------------------------------------------------


def reason(broker: Broker, task: Any) -> str | None:
    waiting = broker.summary(task)["waitReason"]
    return None if waiting is None else str(waiting["code"])


def test_a_queued_task_says_why_it_waits() -> None:
    broker = Broker(BrokerConfig(tenant_quota=1))
    first = broker.submit(submission())
    assert reason(broker, first) == "no_runner"
    assert broker.summary(first)["waitReason"]["message"] == (
        "No runner is connected to this broker. Start one with `sandbox-runner serve`, "
        "N8N_RUNNERS_TASK_BROKER_URI set to this broker's URL and N8N_RUNNERS_AUTH_TOKEN "
        "to its auth token."
    )
    runner = FakeRunner("r1")
    broker.runner_connected(runner)
    assert reason(broker, first) == "no_runner"  # connected, but not registered yet
    broker.runner_message(runner, RunnerInfo())
    assert reason(broker, first) == "runners_busy"  # registered, no free slot
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
    assert first.status is TaskStatus.OFFERED
    assert reason(broker, first) is None
    second = broker.submit(submission())
    assert broker.summary(second)["waitReason"] == {
        "code": "tenant_quota",
        "message": "Tenant 't' already has its quota of 1 tasks running.",
    }
    broker.runner_disconnected(runner)  # the offered task goes back to the queue
    assert [reason(broker, t) for t in (first, second)] == ["no_runner", "no_runner"]
    broker.drain()
    assert reason(broker, first) == "draining"
    broker.cancel(first)
    assert reason(broker, first) is None
    assert set(broker.summary(first)) == {
        "taskId",
        "status",
        "mode",
        "submittedAt",
        "runnerId",
        "waitReason",
    }


def test_queue_timeout_with_no_runner_ever_says_so_and_how_to_add_one() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(queue_timeout_s=0.05), clock=clock)
    task = broker.submit(submission())
    advance(broker, clock, 0.1)
    assert task.document is not None
    assert task.document["error"] == {
        "message": "No runner took the task in time: "
        "no runner was connected to this broker while it waited",
        "description": "It waited 0.05 s in the queue (SANDBOX_QUEUE_TIMEOUT_S). "
        "No runner is connected to this broker. Start one with `sandbox-runner serve`, "
        "N8N_RUNNERS_TASK_BROKER_URI set to this broker's URL and N8N_RUNNERS_AUTH_TOKEN "
        "to its auth token.",
        "code": "queue_timeout",
        "stage": "queue",
    }


def test_queue_timeout_after_the_last_runner_left_says_when() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(queue_timeout_s=0.05), clock=clock)
    runner = connect(broker)
    task = broker.submit(submission())
    clock.now += 1
    broker.runner_disconnected(runner)
    advance(broker, clock, 7)
    assert task.document is not None
    assert task.document["error"]["message"] == (
        "No runner took the task in time: "
        "no runner is connected to this broker (the last one left 7 s ago)"
    )


def test_queue_timeout_with_busy_runners_or_a_full_quota_says_which() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(queue_timeout_s=0.05, tenant_quotas={"full": 1}), clock=clock)
    runner = connect(broker, offers=1)
    broker.submit(submission("full"))  # takes the one offer: "full" is at its quota
    over_quota = broker.submit(submission("full"))
    busy = broker.submit(submission("other"))
    assert runner.of(TaskOfferAccept)
    advance(broker, clock, 0.1)
    assert over_quota.document is not None
    assert busy.document is not None
    assert over_quota.document["error"]["message"] == (
        "No runner took the task in time: its tenant had its quota of 1 tasks running"
    )
    assert busy.document["error"]["message"] == (
        "No runner took the task in time: every connected runner was busy"
    )
    assert busy.document["error"]["description"] == (
        "It waited 0.05 s in the queue (SANDBOX_QUEUE_TIMEOUT_S). "
        "Every connected runner is busy (no free slot)."
    )


# -- late acceptances ---------------------------------------------------------------------


def test_acceptance_after_the_api_cancelled_the_offer_frees_the_runner_slot() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    assert task.status is TaskStatus.OFFERED
    broker.cancel(task)
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    assert [(c.task_id, c.reason) for c in runner.of(TaskCancel)] == [
        (task.task_id, "Task is no longer wanted")
    ]
    assert runner.of(TaskSettingsMessage) == []
    assert task.document is not None
    assert task.document["error"]["code"] == "cancelled"


def test_acceptance_after_the_accept_timeout_frees_the_slot_and_the_task_runs_later() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(accept_timeout_s=0.05), clock=clock)
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    advance(broker, clock, 0.1)
    assert task.status is TaskStatus.QUEUED
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    assert [(c.task_id, c.reason) for c in runner.of(TaskCancel)] == [
        (task.task_id, "Task is no longer wanted")
    ]
    assert task.status is TaskStatus.QUEUED  # still wanted, by a fresh offer
    broker.runner_message(runner, TaskOffer(offer_id="again", valid_for=5000))
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    assert task.status is TaskStatus.RUNNING
    assert [s.task_id for s in runner.of(TaskSettingsMessage)] == [task.task_id]


def test_acceptance_of_an_unknown_task_is_answered_with_a_cancel() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker)
    broker.runner_message(runner, TaskAccepted(task_id="never-offered"))
    assert [(c.task_id, c.reason) for c in runner.of(TaskCancel)] == [
        ("never-offered", "Task is no longer wanted")
    ]


def test_acceptance_by_a_runner_the_task_was_not_offered_to_does_not_touch_it() -> None:
    broker = Broker(BrokerConfig())
    owner = connect(broker, "r1", offers=1)
    other = connect(broker, "r2")
    task = broker.submit(submission())
    broker.runner_message(other, TaskAccepted(task_id=task.task_id))
    assert [c.task_id for c in other.of(TaskCancel)] == [task.task_id]
    assert owner.of(TaskCancel) == []
    assert task.status is TaskStatus.OFFERED
    assert task.runner_id == "r1"


def test_a_repeated_acceptance_of_a_running_task_is_ignored() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    assert runner.of(TaskCancel) == []
    assert len(runner.of(TaskSettingsMessage)) == 1
    assert task.status is TaskStatus.RUNNING


# -- per-tenant retention and backlog -------------------------------------------------------


def test_one_tenants_volume_does_not_evict_another_tenants_results() -> None:
    broker = Broker(BrokerConfig(max_tasks_kept=2))
    kept = broker.submit(submission("b"))
    broker.cancel(kept)
    a_tasks = [broker.submit(submission("a")) for _ in range(5)]
    for task in a_tasks:
        broker.cancel(task)
    assert broker.get(kept.task_id) is kept
    # each tenant keeps its own last 2 finished tasks
    assert [t.task_id for t in broker.recent("a", 10)] == [t.task_id for t in a_tasks[:2:-1]]
    assert [broker.get(t.task_id) for t in a_tasks[:3]] == [None, None, None]


def test_unfinished_tasks_are_not_evicted_however_many_finish() -> None:
    broker = Broker(BrokerConfig(max_tasks_kept=1))
    waiting = broker.submit(submission("a"))
    for _ in range(3):
        broker.cancel(broker.submit(submission("a")))
    assert broker.get(waiting.task_id) is waiting
    assert len(broker.recent("a", 10)) == 2  # the queued one and the last finished one


def test_a_tenant_over_its_backlog_cap_is_refused_and_others_are_not() -> None:
    broker = Broker(BrokerConfig(max_unfinished_per_tenant=2))
    runner = connect(broker, offers=1)
    first = broker.submit(submission("a"))  # offered
    broker.submit(submission("a"))  # queued
    with pytest.raises(TenantBacklogFull, match="'a' already has 2 unfinished tasks"):
        broker.submit(submission("a"))
    assert len(broker.recent("a", 10)) == 2
    broker.submit(submission("b"))  # another tenant is not affected
    run_accepted(broker, runner)
    broker.runner_message(runner, TaskDone(task_id=first.task_id, data=TaskDoneData(result=1)))
    broker.submit(submission("a"))  # one finished: room again


# -- bytes: what a tenant may make the broker hold ---------------------------------------

MIB = 1024 * 1024


def sized(tenant: str, size: int) -> Submission:
    """A submission whose settings take about ``size`` bytes as JSON."""
    return submission(tenant, code="#" * size)


def test_a_tenant_over_its_queued_bytes_is_refused_and_others_are_not() -> None:
    broker = Broker(BrokerConfig(max_queued_bytes_per_tenant=MIB))
    broker.submit(sized("a", 400_000))
    broker.submit(sized("a", 400_000))
    with pytest.raises(TenantBacklogFull, match=r"'a' already has \d+ bytes of unfinished") as e:
        broker.submit(sized("a", 400_000))
    assert "its budget of 1048576 bytes (SANDBOX_TENANT_QUEUED_BYTES)" in str(e.value)
    assert len(broker.recent("a", 10)) == 2
    broker.submit(sized("b", 900_000))  # another tenant has its own budget
    with pytest.raises(TaskTooLarge, match="more than the 1048576 bytes a tenant may have"):
        broker.submit(sized("c", 2 * MIB))  # can never fit: not a "retry later"


def test_sent_settings_no_longer_count_against_the_tenant() -> None:
    broker = Broker(BrokerConfig(max_queued_bytes_per_tenant=MIB))
    runner = connect(broker, offers=1)
    first = broker.submit(sized("a", 600_000))
    with pytest.raises(TenantBacklogFull):
        broker.submit(sized("a", 600_000))
    run_accepted(broker, runner)  # its settings went to the runner: the broker drops them
    assert first.settings is None
    second = broker.submit(sized("a", 600_000))
    broker.cancel(second)  # a queued task that ends gives its bytes back too
    broker.submit(sized("a", 600_000))


def finish(broker: Broker, runner: FakeRunner, tenant: str, result: Any) -> Any:
    task = broker.submit(submission(tenant))
    broker.runner_message(runner, TaskOffer(offer_id=f"o-{task.task_id}", valid_for=5000))
    run_accepted(broker, runner)
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=result)))
    assert task.document_json is not None
    return task


def test_retained_results_past_the_byte_budget_are_forgotten_oldest_first() -> None:
    broker = Broker(BrokerConfig(max_retained_bytes_per_tenant=MIB))
    runner = connect(broker)
    other = finish(broker, runner, "b", "y" * 900_000)
    first, second, third = (finish(broker, runner, "a", "x" * 400_000) for _ in range(3))
    assert broker.get(first.task_id) is None  # 3 x 400 KB > 1 MiB: the oldest went
    assert broker.get(second.task_id) is second
    assert broker.get(third.task_id) is third
    assert broker.get(other.task_id) is other  # another tenant's result stays
    # One result larger than the whole budget is still kept (the newest always is),
    # and it evicts everything older of its tenant.
    huge = finish(broker, runner, "a", "z" * (2 * MIB))
    assert [t.task_id for t in broker.recent("a", 10)] == [huge.task_id]
    assert huge.document["result"] == "z" * (2 * MIB)
    assert broker.get(other.task_id) is other


def test_a_queued_task_holds_about_its_json_size_not_a_hundred_times_more() -> None:
    # One {} item is 3 bytes of JSON but ~64 bytes as a dict (and ~250 once wrapped in
    # {"json": ...} and copied by the API's model): the issue measured 1.4 GB kept for
    # one 16 MiB request. The submitted objects are parsed here, measured.
    body = json.dumps([{}] * 200_000, separators=(",", ":"))
    broker = Broker(BrokerConfig())
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        items = json.loads(body)
        task = broker.submit(Submission(tenant="t", code="", items=items, mode=Mode.ALL_ITEMS))
        del items
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # {"json":{}} per {} item: the task's JSON text is 4 times the JSON given here
    # (b3a21b2 kept the objects: ~25 times).
    assert task.status is TaskStatus.QUEUED
    assert held < 5 * len(body), (held, len(body))


def test_a_settings_frame_that_cannot_be_sent_ends_the_task_at_once() -> None:
    class BrokenRunner(FakeRunner):
        """Sending the settings raises (b3a21b2 encoded them in ``send``)."""

        def send(self, message: Any) -> None:
            if isinstance(message, TaskSettingsMessage):
                raise ValueError("Maximum serialization depth exceeded")
            super().send(message)

        def send_frame(self, frame: str) -> None:
            raise ValueError("Maximum serialization depth exceeded")

    broker = Broker(BrokerConfig())
    runner = BrokenRunner("r1")
    broker.runner_connected(runner)
    broker.runner_message(runner, RunnerInfo())
    broker.runner_message(runner, TaskOffer(offer_id="o1", valid_for=5000))
    task = broker.submit(submission("a"))
    with contextlib.suppress(ValueError):  # as the web layer: log it, drop the frame
        broker.runner_message(runner, TaskAccepted(task_id=task.task_id))
    # At once, not when the task timer fires (timeout + grace: 615 s with the defaults).
    assert task.status is TaskStatus.ERROR
    assert task.document is not None
    assert task.document["error"] == {
        "message": "The broker could not send the task's settings to the runner",
        "description": "ValueError: Maximum serialization depth exceeded",
        "code": "dispatch_failed",
        "stage": "dispatch",
    }
    # The runner's slot is freed.
    assert [c.task_id for c in runner.of(TaskCancel)] == [task.task_id]


def test_a_report_that_is_not_json_becomes_an_error_the_caller_can_parse() -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker)
    task = finish(broker, runner, "a", float("nan"))  # json.loads takes NaN from a runner
    assert task.document["status"] == "error"
    assert task.document["error"]["code"] == "invalid_report"
    assert "NaN" not in (task.document_json or "")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"query": {"a": float("inf")}}, "NaN and Infinity are not JSON"),
        ({"query": functools.reduce(lambda v, _: [v], range(129), 1)}, "query nests deeper"),
    ],
    ids=["infinity", "too-deep"],
)
def test_settings_that_cannot_travel_are_refused_at_submission(
    kwargs: dict[str, Any], fragment: str
) -> None:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    with pytest.raises(SubmissionRefused, match=fragment):
        broker.submit(submission("a", **kwargs))
    assert runner.of(TaskOfferAccept) == []


# -- caller schemas against results ------------------------------------------------------


def finish_with(result: Any, output_schema: dict[str, Any]) -> dict[str, Any]:
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=2)
    task = broker.submit(submission(output_schema=output_schema))
    run_accepted(broker, runner)
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=result)))
    # the broker keeps serving this runner
    second = broker.submit(submission())
    assert runner.of(TaskOfferAccept)[-1].task_id == second.task_id
    assert task.document is not None
    return task.document["error"]  # type: ignore[no-any-return]


def test_a_deep_result_against_a_recursive_output_schema_is_a_violation() -> None:
    schema = {"anyOf": [{"allOf": [{"type": "array", "items": {"$ref": "#"}}]}]}
    error = finish_with(nested_list(125), schema)
    assert error["code"] == "output_schema_violation"
    assert error["description"] == (
        "result: nests deeper than 64 levels, too deep to validate against the schema"
    )
    # 64 levels are validated as usual
    broker = Broker(BrokerConfig())
    runner = connect(broker, offers=1)
    task = broker.submit(submission(output_schema=schema))
    run_accepted(broker, runner)
    broker.runner_message(
        runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=nested_list(64)))
    )
    assert task.document is not None
    assert task.document["status"] == "success"


def test_a_ref_cycle_that_consumes_no_data_is_a_violation_not_a_crash() -> None:
    error = finish_with(1, {"anyOf": [{"$ref": "#"}]})
    assert error["code"] == "output_schema_violation"
    assert error["description"] == (
        "result: the schema recurses too deeply to validate (a $ref cycle that consumes no data?)"
    )


def test_exponential_validation_work_is_cut_off_by_the_budget() -> None:
    # each level tries both branches in full: 2**30 checks without the budget
    schema = {"anyOf": [{"items": {"$ref": "#"}, "minItems": 5}, {"items": {"$ref": "#"}}]}
    error = finish_with(nested_list(30), schema)
    assert error["code"] == "output_schema_violation"
    assert error["description"] == (
        "result: validating against the schema takes more checks than the broker "
        "allows; simplify the schema or send less data"
    )


def test_a_nested_dollar_schema_does_not_escape_the_budget() -> None:
    # jsonschema switches validator class on a subschema's $schema; ours stays metered
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "items": {"$schema": "http://json-schema.org/draft-07/schema#", "enum": list(range(500))},
    }
    # every element matches (the last entry): no error stops the work early
    error = validate_input(schema, [{"json": [499] * 400}])
    assert error is not None
    assert "takes more checks than the broker allows" in error


def test_references_are_never_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def urlopen(request: Any, *args: Any, **kwargs: Any) -> Any:
        fetched.append(request.full_url)
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    url = "http://169.254.169.254/latest/meta-data"
    assert validate_input({"$ref": url}, [{"json": 1}]) == (
        f"items[0].json: the schema's reference {url!r} cannot be resolved"
    )
    assert fetched == []


def test_drain_is_reported_to_the_web_layer() -> None:
    # The web layer's `closing` (long-polls of queued tasks answer at once) follows it.
    broker = Broker(BrokerConfig())
    assert not broker.is_draining
    broker.drain()
    assert broker.is_draining
    assert broker.events() == [Draining()]


def test_errors_stop_the_work_early_and_their_messages_stay_short() -> None:
    # 40,000 dependent names per element, 30 elements: millions of errors if all were
    # collected; the first ones name the problem, and a long value is shortened.
    names = [f"k{n}" for n in range(40_000)]
    schema = {"items": {"dependentRequired": {"a": names}}}
    error = validate_input(schema, [{"json": [{"a": 1}] * 30}])
    assert error is not None
    assert error.startswith("items[0].json[0]: ")
    assert error.endswith("... (shortened)") or len(error) < 600


def test_ordinary_large_payloads_fit_the_budget() -> None:
    row = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "ok": {"type": "boolean"},
            "score": {"type": "number"},
        },
        "required": ["id", "name"],
    }
    items = [{"json": {"id": n, "name": "x", "ok": True, "score": 1.5}} for n in range(12_000)]
    assert validate_input(row, items) is None


def test_prints_are_capped_whatever_a_runner_sends() -> None:
    """A runner's prints are untrusted: at most max_print_calls entries and
    max_print_chars characters per task, from rpcs and from the report alike; wrong
    shapes and prints of a task the runner does not run are dropped and counted."""
    registry = CollectorRegistry()
    broker = Broker(
        BrokerConfig(max_print_calls=3, max_print_chars=10), metrics=BrokerMetrics(registry)
    )
    runner = connect(broker, offers=2)
    other = connect(broker, "r2")
    task = broker.submit(submission())
    (task_id,) = run_accepted(broker, runner)
    assert task_id == task.task_id
    for params in (("'a'",), ("x" * 20,), ("'b'",)):
        broker.runner_message(
            runner, Rpc(call_id="c", task_id=task_id, name="logNodeOutput", params=params)
        )
    # Not this runner's task: ignored.
    broker.runner_message(
        other, Rpc(call_id="c", task_id=task_id, name="logNodeOutput", params=("'z'",))
    )
    flood = [["'c'"], "not a list", [1], ["'d'"], ["'e'"]] + [[]] * 300_000
    broker.runner_message(
        runner,
        TaskDone(
            task_id=task_id,
            data=TaskDoneData(result=1),
            sandbox={"code": None, "stage": None, "audit": None, "prints": flood},
        ),
    )
    assert task.document is not None
    assert task.document["prints"] == [["'a'"], ["'b'"], ["'c'"]]
    dropped = registry.get_sample_value("sandbox_broker_prints_dropped_total")
    assert dropped == 1 + len(flood) - 1  # x*20 over the chars, then all but 'c'


# -- time comes in through tick(now) ------------------------------------------------------


def test_a_deadline_fires_at_its_time_not_before_and_the_next_one_is_announced() -> None:
    clock = FakeClock()
    changes: list[None] = []
    broker = Broker(BrokerConfig(accept_timeout_s=2, queue_timeout_s=300), clock=clock)
    broker.subscribe(lambda: changes.append(None))
    assert broker.next_deadline() is None
    connect(broker, offers=1)
    task = broker.submit(submission())
    assert changes  # the web layer is told to look at next_deadline() again
    assert (task.timer, task.deadline) == ("accept", 102.0)
    assert broker.next_deadline() == 102.0
    broker.tick(101.99)
    assert task.status is TaskStatus.OFFERED
    advance(broker, clock, 2)
    assert task.status is TaskStatus.QUEUED
    assert (task.timer, broker.next_deadline()) == ("queue", 402.0)
    broker.cancel(task)
    assert (task.timer, task.deadline, broker.next_deadline()) == (None, None, None)


def test_each_finished_task_is_reported_once() -> None:
    broker = Broker(BrokerConfig())
    first, second = broker.submit(submission()), broker.submit(submission())
    assert broker.events() == []
    broker.cancel(second)
    broker.cancel(first)
    broker.cancel(first)
    assert broker.events() == [TaskFinished(second.task_id), TaskFinished(first.task_id)]
    assert broker.events() == []


def test_deadlines_come_due_earliest_first_and_rearming_replaces() -> None:
    deadlines = Deadlines()
    for key, when in (("a", 5.0), ("b", 3.0), ("c", 3.0), ("d", 9.0)):
        deadlines.arm(key, when)
    deadlines.arm("a", 1.0)  # re-armed: only the new time counts
    deadlines.disarm("d")
    assert deadlines.next() == 1.0
    assert [deadlines.pop_due(4.0) for _ in range(4)] == ["a", "b", "c", None]
    assert (deadlines.next(), len(deadlines)) == (None, 0)
    for n in range(1000):  # many re-arms leave no pile of stale entries behind
        deadlines.arm("x", float(n))
    assert len(deadlines._heap) < 200
    assert (deadlines.next(), deadlines.pop_due(1e9), deadlines.pop_due(1e9)) == (999.0, "x", None)


# -- sandbox-ack: a completion acknowledged once the broker has it -----------------------


def test_a_completion_asking_for_an_ack_gets_one_after_the_task_took_it() -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(runner_lost_grace_s=5), clock=clock)
    runner = connect(broker, "r1", offers=1)
    assert "sandbox-ack" in runner.of(RunnerRegistered)[0].extensions
    task = broker.submit(submission())
    run_accepted(broker, runner)
    acked: list[tuple[str, bool]] = []
    real_send = runner.send

    def send(message: Any) -> None:
        if isinstance(message, TaskAck):  # what the task looked like when the ack left
            acked.append((message.task_id, task.document is not None))
        real_send(message)

    runner.send = send  # type: ignore[method-assign]
    done = TaskDone(task_id=task.task_id, data=TaskDoneData(result=1), sandbox={"ack": True})
    broker.runner_message(runner, done)
    assert acked == [(task.task_id, True)]
    # Sent again after a reconnect (its ack was lost): dropped as a copy, acked again.
    again = connect(broker, "r1")
    copy = TaskDone(task_id=task.task_id, data=TaskDoneData(result=2), sandbox={"ack": True})
    broker.runner_message(again, copy)
    assert task.document is not None
    assert task.document["result"] == 1
    assert [m.task_id for m in again.of(TaskAck)] == [task.task_id]


def test_a_completion_lost_with_the_socket_counts_when_it_comes_again() -> None:
    # The runner's socket died with the first copy unread: the task stays running under
    # the runner-lost grace, and the copy sent after the reconnect finishes it.
    clock = FakeClock()
    broker = Broker(BrokerConfig(runner_lost_grace_s=5), clock=clock)
    runner = connect(broker, "r1", offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_disconnected(runner)
    advance(broker, clock, 1)
    again = connect(broker, "r1")
    done = TaskDone(task_id=task.task_id, data=TaskDoneData(result=7), sandbox={"ack": True})
    broker.runner_message(again, done)
    assert task.status is TaskStatus.SUCCESS
    assert task.document is not None
    assert task.document["result"] == 7
    assert [m.task_id for m in again.of(TaskAck)] == [task.task_id]


def test_no_ack_for_a_completion_that_does_not_ask() -> None:
    # n8n's runner (and ours on a broker without the extension) never gets one.
    broker = Broker(BrokerConfig(), clock=FakeClock())
    runner = connect(broker, "r1", offers=1)
    task = broker.submit(submission())
    run_accepted(broker, runner)
    broker.runner_message(runner, TaskDone(task_id=task.task_id, data=TaskDoneData(result=1)))
    assert task.document is not None
    assert runner.of(TaskAck) == []
