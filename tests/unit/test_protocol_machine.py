"""RunnerProtocol: n8n's runner-side rules, driven with no sockets and no sleeps."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from runner.protocol.machine import (
    REJECT_CAPACITY,
    REJECT_DUPLICATE,
    REJECT_EXPIRED,
    CancelTask,
    Completion,
    IdleTimeout,
    RunnerProtocol,
    StartTask,
    TaskState,
    Undeliverable,
)
from runner.sandbox.base import Mode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, max_concurrency: int = 2, **kw: Any) -> RunnerProtocol:
    counter = itertools.count(1)
    return RunnerProtocol(
        max_concurrency=max_concurrency,
        max_payload=kw.pop("max_payload", 1 << 20),
        clock=clock,
        new_id=lambda: f"id{next(counter):04d}",
        jitter_ms=lambda: 56,
        **kw,
    )


def sent(machine: RunnerProtocol) -> list[dict[str, Any]]:
    return [json.loads(out.frame) for out in machine.frames_to_send()]


def feed(machine: RunnerProtocol, **message: Any) -> None:
    machine.receive_frame(json.dumps(message))


def register(machine: RunnerProtocol, extensions: list[str] | None = None) -> list[dict[str, Any]]:
    machine.connection_made()
    feed(machine, type="broker:inforequest")
    feed(
        machine,
        type="broker:runnerregistered",
        **({"extensions": extensions} if extensions else {}),
    )
    return sent(machine)


SETTINGS = {"code": "return 1", "nodeMode": "runOnceForAllItems", "items": [{"json": {}}]}


def accept(machine: RunnerProtocol, task_id: str, offer_id: str) -> list[dict[str, Any]]:
    feed(machine, type="broker:taskofferaccept", taskId=task_id, offerId=offer_id)
    return sent(machine)


def start(machine: RunnerProtocol, task_id: str = "t1", settings: Any = None) -> StartTask:
    offers = [m for m in register(machine) if m["type"] == "runner:taskoffer"]
    accept(machine, task_id, offers[0]["offerId"])
    feed(machine, type="broker:tasksettings", taskId=task_id, settings=settings or SETTINGS)
    events = machine.events()
    assert isinstance(events[0], StartTask)
    return events[0]


def test_registration_and_offers(clock: Clock) -> None:
    machine = make(clock, max_concurrency=2)
    messages = register(machine)
    assert messages[0] == {"type": "runner:info", "name": "Python Task Runner", "types": ["python"]}
    offers = messages[1:]
    assert [m["type"] for m in offers] == ["runner:taskoffer"] * 2
    assert all(m["taskType"] == "python" and m["validFor"] == 5056 for m in offers)
    assert len({m["offerId"] for m in offers}) == 2


def test_no_offers_before_registration(clock: Clock) -> None:
    machine = make(clock)
    machine.connection_made()
    machine.tick()
    assert sent(machine) == []


def test_offers_are_renewed_after_expiry_and_honoured_for_the_grace(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    (offer,) = register(machine)[1:]
    clock.advance(5.056 + 0.05)  # within validFor + 100 ms
    assert accept(machine, "t1", offer["offerId"]) == [
        {"type": "runner:taskaccepted", "taskId": "t1"}
    ]

    other = make(clock, max_concurrency=1)
    (offer,) = register(other)[1:]
    clock.advance(5.056 + 0.2)
    other.tick()
    renewed = sent(other)
    assert [m["type"] for m in renewed] == ["runner:taskoffer"]
    assert renewed[0]["offerId"] != offer["offerId"]
    assert accept(other, "t2", offer["offerId"]) == [
        {"type": "runner:taskrejected", "taskId": "t2", "reason": REJECT_EXPIRED}
    ]


def test_top_up_counts_open_offers_and_tasks(clock: Clock) -> None:
    machine = make(clock, max_concurrency=3)
    offers = register(machine)[1:]
    accept(machine, "t1", offers[0]["offerId"])
    machine.tick()
    assert sent(machine) == []  # 2 open offers + 1 task = 3
    assert machine.open_offer_count == 2
    assert machine.running_count == 1


def test_unknown_offer_and_capacity_and_duplicate_are_rejected(clock: Clock) -> None:
    machine = make(clock, max_concurrency=2)
    offers = register(machine)[1:]
    assert accept(machine, "t0", "no-such-offer")[0]["reason"] == REJECT_EXPIRED
    assert accept(machine, "t1", offers[0]["offerId"])[0]["type"] == "runner:taskaccepted"
    assert accept(machine, "t1", offers[1]["offerId"])[0]["reason"] == REJECT_DUPLICATE
    machine.max_concurrency = 1
    assert accept(machine, "t2", offers[1]["offerId"])[0]["reason"] == REJECT_CAPACITY


def test_settings_start_the_task(clock: Clock) -> None:
    machine = make(clock)
    event = start(machine, settings={**SETTINGS, "nodeMode": "runOnceForEachItem", "query": "q"})
    assert event.task_id == "t1"
    assert event.settings.node_mode is Mode.PER_ITEM
    assert event.settings.query == "q"
    assert machine.task_state("t1") is TaskState.RUNNING


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"nodeMode": "runOnceForAllItems", "items": []},
            "Missing field in task settings message: 'code'",
        ),
        ({**SETTINGS, "nodeMode": "sideways"}, "Unknown nodeMode: sideways"),
        (
            {**SETTINGS, "items": "nope"},
            "Invalid task settings: items: Input should be a valid list",
        ),
        ("not an object", "Invalid task settings: expected an object, got str"),
    ],
    ids=["missing-code", "unknown-mode", "items-not-list", "not-object"],
)
def test_bad_settings_end_the_task_with_an_error_not_silence(
    clock: Clock, settings: Any, message: str
) -> None:
    machine = make(clock, max_concurrency=1)
    (offer,) = register(machine)[1:]
    accept(machine, "t1", offer["offerId"])
    feed(machine, type="broker:tasksettings", taskId="t1", settings=settings)
    out = sent(machine)
    assert out[0] == {
        "type": "runner:taskerror",
        "taskId": "t1",
        "error": {"message": message, "description": ""},
    }
    assert out[1]["type"] == "runner:taskoffer"  # the slot is free again
    assert machine.events() == []


def test_settings_for_unknown_task_get_an_error(clock: Clock) -> None:
    machine = make(clock)
    register(machine)
    feed(machine, type="broker:tasksettings", taskId="ghost", settings=SETTINGS)
    assert sent(machine)[0]["error"]["message"] == (
        "Failed to find task ghost. This is likely an internal error."
    )


def test_duplicate_settings_are_discarded(clock: Clock) -> None:
    machine = make(clock)
    start(machine)
    feed(machine, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    assert machine.events() == []
    assert sent(machine) == []


def test_completion_sends_prints_then_exactly_one_done(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    machine.finish_task("t1", Completion(result=[{"x": 1}], prints=[["'hi'", "1"], []]))
    machine.finish_task("t1", Completion(result="again"))
    out = sent(machine)
    assert [m["type"] for m in out] == [
        "runner:rpc",
        "runner:rpc",
        "runner:taskdone",
        "runner:taskoffer",
    ]
    assert out[0] == {
        "type": "runner:rpc",
        "callId": out[0]["callId"],
        "taskId": "t1",
        "name": "logNodeOutput",
        "params": ["'hi'", "1"],
    }
    assert out[2] == {"type": "runner:taskdone", "taskId": "t1", "data": {"result": [{"x": 1}]}}


def test_error_completion_keeps_prints_and_omits_missing_description(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    machine.finish_task(
        "t1",
        Completion(error_message="boom", error_description="Traceback...", prints=[["'before'"]]),
    )
    out = sent(machine)
    assert out[0]["type"] == "runner:rpc"
    assert out[1] == {
        "type": "runner:taskerror",
        "taskId": "t1",
        "error": {"message": "boom", "description": "Traceback..."},
    }


def test_cancel_waiting_task_drops_it_and_reoffers(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    (offer,) = register(machine)[1:]
    accept(machine, "t1", offer["offerId"])
    feed(machine, type="broker:taskcancel", taskId="t1", reason="user")
    out = sent(machine)
    assert [m["type"] for m in out] == ["runner:taskoffer"]
    assert machine.task_state("t1") is None
    assert machine.events() == []
    # It never ran here: offered again (the broker requeued it), it is taken, not a duplicate.
    assert accept(machine, "t1", out[0]["offerId"]) == [
        {"type": "runner:taskaccepted", "taskId": "t1"}
    ]


def test_cancel_running_task_asks_the_service_and_reports_cancelled(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    feed(machine, type="broker:taskcancel", taskId="t1", reason="user cancelled")
    assert machine.events() == [CancelTask("t1", "user cancelled")]
    assert machine.task_state("t1") is TaskState.CANCELLING
    machine.finish_task("t1", Completion(error_message="Task was cancelled"))
    assert sent(machine)[0] == {
        "type": "runner:taskerror",
        "taskId": "t1",
        "error": {"message": "Task was cancelled"},
    }


def test_cancel_unknown_task_is_ignored(clock: Clock) -> None:
    machine = make(clock)
    register(machine)
    feed(machine, type="broker:taskcancel", taskId="nope", reason="x")
    assert sent(machine) == []
    assert machine.events() == []


def test_drain_withdraws_offers_and_stops_offering(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    (offer,) = register(machine)[1:]
    feed(machine, type="broker:drain")
    clock.advance(10)
    machine.tick()
    assert sent(machine) == []
    assert accept(machine, "t1", offer["offerId"])[0]["reason"] == REJECT_EXPIRED


def test_oversized_result_becomes_a_clear_task_error(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1, max_payload=200)
    start(machine)
    machine.finish_task("t1", Completion(result="x" * 500))
    error = sent(machine)[0]
    assert error["type"] == "runner:taskerror"
    assert "exceeds the broker's maximum payload of 200 bytes" in error["error"]["message"]


def test_nan_never_reaches_the_wire(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    machine.finish_task("t1", Completion(result=[float("nan"), float("inf"), 1.5]))
    frame = machine.frames_to_send()[0].frame
    assert "NaN" not in frame
    assert "Infinity" not in frame
    assert json.loads(frame)["data"] == {"result": [None, None, 1.5]}  # what JSON.stringify does


def test_completion_while_disconnected_is_held_and_delivered_after_reconnect(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    machine.connection_lost()
    machine.finish_task("t1", Completion(result=1, prints=[["'p'"]]))
    assert sent(machine) == []
    assert machine.held_count == 1
    out = register(machine)
    types = [m["type"] for m in out]
    assert types[:3] == ["runner:info", "runner:rpc", "runner:taskdone"]
    assert types.count("runner:taskdone") == 1
    assert machine.held_count == 0


def test_held_completion_expires_as_undeliverable(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1, undelivered_ttl_s=30)
    start(machine)
    machine.connection_lost()
    machine.finish_task("t1", Completion(result=1))
    clock.advance(31)
    machine.tick()
    assert machine.events() == [Undeliverable("t1", "no broker connection in time")]
    register(machine)
    assert "runner:taskdone" not in [m["type"] for m in sent(machine)]


def test_held_completion_past_its_ttl_is_undeliverable_even_without_a_tick(
    clock: Clock,
) -> None:
    # Re-registration may come before the next tick: a result held past its TTL is
    # reported as undeliverable there, never sent late.
    machine = make(clock, max_concurrency=1, undelivered_ttl_s=30)
    start(machine)
    machine.connection_lost()
    machine.finish_task("t1", Completion(result=1))
    clock.advance(31)
    out = register(machine)
    assert "runner:taskdone" not in [m["type"] for m in out]
    assert machine.events() == [Undeliverable("t1", "no broker connection in time")]
    assert machine.held_count == 0


def test_unsent_completion_frames_are_held(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    start(machine)
    machine.finish_task("t1", Completion(result=1))
    frames = machine.frames_to_send()
    machine.connection_lost()
    machine.unsent(frames)  # the socket died while sending
    assert machine.undelivered_task_ids() == ["t1"]


def test_connection_lost_drops_offers_and_waiting_tasks(clock: Clock) -> None:
    machine = make(clock, max_concurrency=2)
    offers = register(machine)[1:]
    accept(machine, "t1", offers[0]["offerId"])
    machine.connection_lost()
    assert machine.open_offer_count == 0
    assert machine.task_state("t1") is None


def test_idle_timeout_fires_once_per_idle_period(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1, auto_shutdown_s=15)
    register(machine)
    clock.advance(14)
    machine.tick()
    assert machine.events() == []
    clock.advance(2)
    machine.tick()
    assert [type(e) for e in machine.events()] == [IdleTimeout]
    machine.tick()
    assert machine.events() == []


def test_idle_timeout_waits_for_running_tasks(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1, auto_shutdown_s=5)
    start(machine)
    clock.advance(60)
    machine.tick()
    assert machine.events() == []


def test_malformed_and_unknown_frames_are_ignored(clock: Clock) -> None:
    machine = make(clock)
    register(machine)
    for frame in [
        "nope",
        "[1]",
        '{"no": "type"}',
        '{"type": "broker:nodetypes"}',
        '{"type": "broker:taskofferaccept"}',
        b"\xff\xfe",
    ]:
        machine.receive_frame(frame)
    assert sent(machine) == []
    assert machine.events() == []


def test_rpc_responses_are_ignored(clock: Clock) -> None:
    machine = make(clock)
    register(machine)
    feed(machine, type="broker:rpcresponse", callId="c", taskId="t", status="success", data=None)
    assert sent(machine) == []


def test_sandbox_report_only_when_the_broker_asks(clock: Clock) -> None:
    report = {"code": "user_error", "stage": "run", "audit": {"taskId": "t1"}}
    plain = make(clock, max_concurrency=1)
    start(plain)
    plain.finish_task("t1", Completion(error_message="e", error_description="", report=report))
    assert "sandbox" not in sent(plain)[0]

    ours = make(clock, max_concurrency=1)
    offers = [m for m in register(ours, ["sandbox-report"]) if m["type"] == "runner:taskoffer"]
    accept(ours, "t1", offers[0]["offerId"])
    feed(ours, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    ours.finish_task("t1", Completion(error_message="e", error_description="", report=report))
    assert sent(ours)[0]["sandbox"] == report


def test_shutdown_stops_offers_and_accepts(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1)
    (offer,) = register(machine)[1:]
    machine.begin_shutdown()
    assert accept(machine, "t1", offer["offerId"])[0]["reason"] == REJECT_EXPIRED
    machine.tick()
    assert sent(machine) == []


def test_prints_ride_in_the_report_when_the_broker_lists_sandbox_prints(clock: Clock) -> None:
    """Our broker gets one frame per task whatever it printed (no rpc per print call)."""
    report = {"code": None, "stage": None, "audit": {"taskId": "t1"}}
    prints = [[f"'{n}'"] for n in range(50)]
    ours = make(clock, max_concurrency=1)
    extensions = ["sandbox-report", "sandbox-prints"]
    offers = [m for m in register(ours, extensions) if m["type"] == "runner:taskoffer"]
    accept(ours, "t1", offers[0]["offerId"])
    feed(ours, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    ours.finish_task("t1", Completion(result=[1], prints=prints, report=report))
    out = sent(ours)
    assert [m["type"] for m in out] == ["runner:taskdone", "runner:taskoffer"]
    assert out[0]["sandbox"] == {**report, "prints": prints}
    # An error completion too, and an oversized result's error keeps them.
    small = make(clock, max_concurrency=1, max_payload=2000)
    offers = [m for m in register(small, extensions) if m["type"] == "runner:taskoffer"]
    accept(small, "t1", offers[0]["offerId"])
    feed(small, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    small.finish_task("t1", Completion(result="x" * 5000, prints=[["'p'"]], report=report))
    (error,) = [m for m in sent(small) if m["type"] != "runner:taskoffer"]
    assert error["type"] == "runner:taskerror"
    assert error["sandbox"]["prints"] == [["'p'"]]


def test_prints_stay_rpcs_for_a_broker_without_the_extension(clock: Clock) -> None:
    """n8n (and a broker listing only sandbox-report) gets n8n's one rpc per print call."""
    for extensions in ([], ["sandbox-report"], ["sandbox-prints"]):
        machine = make(clock, max_concurrency=1)
        offers = [m for m in register(machine, extensions) if m["type"] == "runner:taskoffer"]
        accept(machine, "t1", offers[0]["offerId"])
        feed(machine, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
        machine.finish_task("t1", Completion(result=1, prints=[["'a'"], ["'b'"]], report={}))
        types = [m["type"] for m in sent(machine)]
        assert types[:3] == ["runner:rpc", "runner:rpc", "runner:taskdone"], extensions


# -- sandbox-ack: a completion kept until the broker has it ------------------------------

OURS = ["sandbox-report", "sandbox-prints", "sandbox-ack"]
REPORT = {"code": None, "stage": None, "audit": {"taskId": "t1"}}


def running_on_ours(clock: Clock, extensions: list[str] = OURS) -> RunnerProtocol:
    machine = make(clock, max_concurrency=1)
    offers = [m for m in register(machine, extensions) if m["type"] == "runner:taskoffer"]
    accept(machine, "t1", offers[0]["offerId"])
    feed(machine, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    return machine


def test_a_sent_completion_lost_with_its_socket_is_sent_again_after_reconnect(
    clock: Clock,
) -> None:
    machine = running_on_ours(clock)
    machine.finish_task("t1", Completion(result=[7], report=REPORT))
    (done,) = [m for m in sent(machine) if m["type"] == "runner:taskdone"]
    assert done["sandbox"]["ack"] is True
    assert machine.unacked_count == 1
    # Written, then the socket died before the broker read it: no ack came.
    machine.connection_lost()
    assert machine.undelivered_task_ids() == ["t1"]
    again = [m for m in register(machine, OURS) if m["type"] == "runner:taskdone"]
    assert again == [done]  # the same frame, once
    assert machine.unacked_count == 1
    feed(machine, type="broker:taskack", taskId="t1")
    assert machine.unacked_count == 0
    # Acknowledged: a later reconnect sends nothing of it.
    machine.connection_lost()
    assert machine.undelivered_task_ids() == []
    assert not [m for m in register(machine, OURS) if m["type"] == "runner:taskdone"]


def test_an_acked_completion_is_forgotten_at_once(clock: Clock) -> None:
    machine = running_on_ours(clock)
    machine.finish_task("t1", Completion(error_message="e", error_description="", report=REPORT))
    assert next(m["type"] for m in sent(machine)) == "runner:taskerror"
    feed(machine, type="broker:taskack", taskId="t1")
    machine.connection_lost()
    assert machine.held_count == 0


def test_a_frame_unsent_and_unacked_is_held_once(clock: Clock) -> None:
    machine = running_on_ours(clock)
    machine.finish_task("t1", Completion(result=1, report=REPORT))
    frames = machine.frames_to_send()
    machine.unsent(frames)  # the socket died while sending it
    machine.connection_lost()
    out = [m for m in register(machine, OURS) if m["type"] == "runner:taskdone"]
    assert len(out) == 1


def test_an_unacked_completion_still_expires_as_undeliverable(clock: Clock) -> None:
    machine = make(clock, max_concurrency=1, undelivered_ttl_s=30)
    offers = [m for m in register(machine, OURS) if m["type"] == "runner:taskoffer"]
    accept(machine, "t1", offers[0]["offerId"])
    feed(machine, type="broker:tasksettings", taskId="t1", settings=SETTINGS)
    assert isinstance(machine.events()[0], StartTask)
    machine.finish_task("t1", Completion(result=1, report=REPORT))
    sent(machine)
    machine.connection_lost()
    clock.advance(31)
    machine.tick()
    assert machine.events() == [Undeliverable("t1", "no broker connection in time")]
    assert not [m for m in register(machine, OURS) if m["type"] == "runner:taskdone"]


@pytest.mark.parametrize(
    "extensions", [[], ["sandbox-report", "sandbox-prints"], ["sandbox-ack"]], ids=str
)
def test_without_the_ack_extension_nothing_is_kept_and_nothing_asks(
    clock: Clock, extensions: list[str]
) -> None:
    # n8n's broker (and ours without the extension): n8n's frames, at most once.
    machine = running_on_ours(clock, extensions)
    machine.finish_task("t1", Completion(result=1, report=REPORT))
    (done,) = [m for m in sent(machine) if m["type"] == "runner:taskdone"]
    assert "ack" not in (done.get("sandbox") or {})
    assert machine.unacked_count == 0
    machine.connection_lost()
    assert machine.held_count == 0
