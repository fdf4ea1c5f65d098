"""Malformed and oversized WebSocket frames, both ways, over real sockets.

Against the embedded broker: a fake runner (a raw websocket client) sends every kind
of broken frame; each gets exactly one warning in the broker's log naming what is
wrong with it (the broker runs in this process: ``caplog``), its connection stays
usable, an oversized frame closes only that connection (1009), and a real runner
connected to the same broker keeps serving tasks meanwhile.

Against the runner's client: the broker sends a real `sandbox-runner serve` broken
frames (``WsRunner.send_frame``); the runner logs one line per frame naming the
problem (or answers it over the protocol, asserted separately), ignores them and
keeps serving; an oversized frame makes it drop the connection and reconnect by
itself.

The runners run on this host's default engine (``SANDBOX_BACKEND=auto``), once: the
frames never reach an engine (``serve`` on each engine: test_broker_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from runner.broker_server.app import WsRunner

from .harness import (
    AUTH_TOKEN,
    RunnerProcess,
    completions,
    finished,
    start_broker,
    submit,
)

pytestmark = pytest.mark.usefixtures("task_image")

MAX_PAYLOAD = 256 * 1024  # room for frames nested deeper than any stack

FAKE_ID = "fakeRunner0123456789ab"
BAD_FRAMES: dict[str, str | bytes] = {
    "not-json": "this is not json",
    "empty": "",
    "binary-not-utf8": b"\xff\xfe\x00garbage",
    "nesting-deeper-than-the-stack": "[" * 100_000,
    "object-nesting": '{"a":' * 20_000 + "1" + "}" * 20_000,
    "array": "[1, 2, 3]",
    "string": '"runner:info"',
    "no-type": '{"taskId": "x"}',
    "type-not-a-string": '{"type": 42}',
    "unknown-type": '{"type": "runner:surprise"}',
    "missing-fields": '{"type": "runner:taskoffer"}',
    "wrong-field-types": '{"type": "runner:taskoffer", "offerId": [], "validFor": "soon"}',
    "nan": '{"type": "runner:taskoffer", "offerId": "o", "validFor": NaN}',
    "huge-number": '{"type": "runner:taskoffer", "offerId": "o", "validFor": ' + "9" * 5000 + "}",
    "done-for-an-unknown-task": '{"type": "runner:taskdone", "taskId": "nope", "data": {}}',
    "just-under-the-limit": '{"type": "x", "pad": "' + "a" * (MAX_PAYLOAD - 100) + '"}',
}

# What the broker's warning must say about each frame ("runner <id> sent a bad frame:
# <this>"). The one well-formed frame among them, a completion for a task nobody
# knows, is no bad frame: before runner:info the broker ignores every message (as
# n8n's does); it is asserted separately.
WELL_FORMED = "done-for-an-unknown-task"
BROKER_WARNS: dict[str, str] = {
    "not-json": "Frame is not JSON: Expecting value",
    "empty": "Frame is not JSON: Expecting value",
    "binary-not-utf8": "Frame is not UTF-8",
    "nesting-deeper-than-the-stack": "Frame is not JSON: maximum recursion depth exceeded",
    "object-nesting": "Frame is not JSON: maximum recursion depth exceeded",
    "array": "Frame is not a JSON object but list",
    "string": "Frame is not a JSON object but str",
    "no-type": "Frame has no 'type'",
    "type-not-a-string": "Frame has no 'type'",
    "unknown-type": "Unknown message type: runner:surprise",
    "missing-fields": "Invalid runner:taskoffer message: offerId: Field required",
    "wrong-field-types": (
        "Invalid runner:taskoffer message: offerId: Input should be a valid string"
    ),
    "nan": "Invalid runner:taskoffer message: validFor: Input should be a finite number",
    "huge-number": "Frame is not JSON: Exceeds the limit (4300 digits) for integer string",
    "just-under-the-limit": "Unknown message type: x",
}
BAD_FRAME_WARNING = f"runner {FAKE_ID} sent a bad frame: "


async def grant_token(url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{url}/runners/auth", json={"token": AUTH_TOKEN})
    response.raise_for_status()
    return str(response.json()["data"]["token"])


async def receive_type(socket: ClientConnection, timeout_s: float = 5) -> str:
    return str(json.loads(await asyncio.wait_for(socket.recv(), timeout_s))["type"])


def broker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("runner.broker_server")]


async def test_a_broker_ignores_broken_frames_closes_oversized_ones_and_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert set(BROKER_WARNS) == set(BAD_FRAMES) - {WELL_FORMED}
    caplog.set_level(logging.INFO, logger="runner.broker_server")
    async with start_broker(max_payload=MAX_PAYLOAD) as running:
        core = running.broker
        core.log_messages = True
        runner = RunnerProcess(running.url, {"N8N_RUNNERS_MAX_PAYLOAD": str(MAX_PAYLOAD)})
        try:
            await runner.wait_connected(core)
            ws_url = (
                running.url.replace("http://", "ws://") + "/runners/_ws?id=fakeRunner0123456789ab"
            )
            headers = {"Authorization": f"Bearer {await grant_token(running.url)}"}
            async with connect(ws_url, additional_headers=headers, max_size=None) as fake:
                assert await receive_type(fake) == "broker:inforequest"
                for name, frame in BAD_FRAMES.items():
                    await fake.send(frame)
                    # Still open and answering: a ping round-trips after every frame.
                    pong = await fake.ping()
                    try:
                        await asyncio.wait_for(pong, 5)
                    except (TimeoutError, ConnectionClosed) as exc:
                        raise AssertionError(f"the broker dropped us after {name}") from exc
                # Then the same connection registers normally. The broker reads one
                # connection's frames in order: once it answers runner:info, every
                # bad frame before it has been handled (and logged).
                await fake.send(json.dumps({"type": "runner:info", "name": "fake", "types": []}))
                assert await receive_type(fake) == "broker:runnerregistered"
                assert FAKE_ID in core.runner_ids()

                # One warning per bad frame, in the order sent, naming the problem.
                about_fake = [r for r in broker_records(caplog) if FAKE_ID in r.getMessage()]
                warned = [
                    (r.levelname, r.getMessage())
                    for r in about_fake
                    if r.getMessage().startswith(BAD_FRAME_WARNING)
                ]
                assert len(warned) == len(BROKER_WARNS), "\n".join(m for _, m in warned)
                for (name, fragment), (level, message) in zip(
                    BROKER_WARNS.items(), warned, strict=True
                ):
                    assert level == "WARNING", (name, level, message)
                    assert message.startswith(BAD_FRAME_WARNING + fragment), (name, message)
                # Nothing else was said about the fake runner until it registered.
                assert len(about_fake) == len(warned), [r.getMessage() for r in about_fake]
                # The well-formed completion decoded (it is in the message log) and was
                # ignored without a word, the fake not being registered yet.
                assert [
                    (m["type"], m.get("taskId")) for rid, m in core.message_log if rid == FAKE_ID
                ] == [("runner:taskdone", "nope"), ("runner:info", None)]
                # Registered, the same completion is dropped with a log line naming it.
                await fake.send(BAD_FRAMES[WELL_FORMED])
                await until(
                    lambda: [
                        r
                        for r in broker_records(caplog)
                        if r.getMessage() == "completion of unknown or finished task nope dropped"
                    ],
                    what="the broker's line about the completion of an unknown task",
                )

                # The real runner is served all along.
                task = submit(core, "return 'still served'")
                assert (await finished(task))["result"] == "still served"
                assert len(completions(core, task.task_id)) == 1

                # One frame over the limit: that connection, and only it, is closed.
                await fake.send('{"type": "runner:info", "pad": "' + "a" * MAX_PAYLOAD + '"}')
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(fake.recv(), 10)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1009  # message too big
            await until(
                lambda: FAKE_ID not in core.runner_ids(), what="the fake runner to be dropped"
            )
            assert core.runner_ids() == [runner.runner_id]
            after = submit(core, "return 'after the oversized frame'")
            assert (await finished(after))["result"] == "after the oversized frame"
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{running.url}/healthz")).json() == {"status": "ok"}
        finally:
            assert await runner.aclose() == 0, runner.output


@dataclass(frozen=True)
class BadBrokerFrame:
    frame: str
    # The runner's one log line about it (level, start of the message), or None when
    # the runner answers it over the protocol instead (``answer``: the frame's type).
    line: tuple[str, str] | None
    answer: str | None = None


BAD_BROKER_FRAMES: dict[str, BadBrokerFrame] = {
    "not-json": BadBrokerFrame(
        "}{", ("WARNING", "Error handling message: Frame is not JSON: Expecting value")
    ),
    "nesting-deeper-than-the-stack": BadBrokerFrame(
        "[" * 100_000,
        ("WARNING", "Error handling message: Frame is not JSON: maximum recursion depth"),
    ),
    "array": BadBrokerFrame(
        "[]", ("WARNING", "Error handling message: Frame is not a JSON object but list")
    ),
    # A type the runner does not know is n8n's "unhandled message": info, not warning.
    "unknown-type": BadBrokerFrame(
        '{"type": "broker:surprise"}',
        ("INFO", "Error handling message: Unknown message type: broker:surprise"),
    ),
    "missing-fields": BadBrokerFrame(
        '{"type": "broker:taskofferaccept"}',
        (
            "WARNING",
            "Error handling message: Invalid broker:taskofferaccept message: taskId: "
            "Field required",
        ),
    ),
    "wrong-field-types": BadBrokerFrame(
        '{"type": "broker:taskofferaccept", "taskId": 1, "offerId": {}}',
        (
            "WARNING",
            "Error handling message: Invalid broker:taskofferaccept message: taskId: "
            "Input should be a valid string",
        ),
    ),
    # Well-formed, for an offer the runner never made: rejected, as n8n's runner does.
    "accept-for-an-unknown-offer": BadBrokerFrame(
        '{"type": "broker:taskofferaccept", "taskId": "t-x", "offerId": "no-such-offer"}',
        None,
        answer="runner:taskrejected",
    ),
    # Well-formed, for a task it never accepted: a warning and a task error.
    "settings-for-an-unknown-task": BadBrokerFrame(
        '{"type": "broker:tasksettings", "taskId": "t-y", '
        '"settings": {"code": "return 1", "nodeMode": "runOnceForAllItems"}}',
        ("WARNING", "Failed to find task t-y"),
        answer="runner:taskerror",
    ),
    "cancel-for-an-unknown-task": BadBrokerFrame(
        '{"type": "broker:taskcancel", "taskId": "t-z", "reason": "x"}',
        ("INFO", "Received cancel for unknown task: t-z. Discarding message."),
    ),
    "rpc-response": BadBrokerFrame(
        '{"type": "broker:rpcresponse", "callId": "c", "taskId": "t", "status": 1}',
        (
            "WARNING",
            "Error handling message: Invalid broker:rpcresponse message: status: "
            "Input should be a valid string",
        ),
    ),
}
# One line of the runner's text log: "<date> <time> <LEVEL> <logger>: <message>".
RUNNER_LINE = re.compile(r"^\S+ \S+ ([A-Z]+) ([\w.]+): (.*)$")


def machine_lines(output: str, until_line: str) -> list[tuple[str, str]]:
    """The protocol machine's lines after the first connection, up to ``until_line``."""
    lines: list[tuple[str, str]] = []
    connected = False
    for raw in output.splitlines():
        match = RUNNER_LINE.match(raw)
        if match is None:
            continue
        level, logger, message = match.groups()
        if logger == "runner.broker" and message == "Connected to broker":
            connected = True
        elif connected and logger == "runner.protocol.machine":
            if message == until_line:
                return lines
            lines.append((level, message))
    raise AssertionError(f"no line {until_line!r} in the runner's output:\n{output}")


def runner_messages(core: Any, runner_id: str) -> list[dict[str, Any]]:
    return [m for rid, m in core.message_log if rid == runner_id]


async def test_a_runner_ignores_broken_frames_and_reconnects_after_an_oversized_one() -> None:
    async with start_broker() as running:
        core = running.broker
        core.log_messages = True
        runner = RunnerProcess(running.url, {"N8N_RUNNERS_MAX_PAYLOAD": str(MAX_PAYLOAD)})
        try:
            runner_id = await runner.wait_connected(core)
            connection = core.connection(runner_id)
            assert isinstance(connection, WsRunner)
            for bad in BAD_BROKER_FRAMES.values():
                connection.send_frame(bad.frame)
            first = submit(core, "return 'served through the garbage'")
            assert (await finished(first))["result"] == "served through the garbage"
            assert runner.process.poll() is None
            assert core.connection(runner_id) is connection  # never reconnected

            # The runner reads the frames in order, the task's acceptance after them:
            # what its protocol machine logged before accepting the task is what it
            # said about the bad frames, one line each, in order, naming the problem.
            accepted = f"Accepted task {first.task_id}"
            # The runner's output is read by a thread: wait for the line, do not race it.
            await until(lambda: accepted in runner.output, what="the runner's acceptance line")
            logged = machine_lines(runner.output, accepted)
            expected = [bad.line for bad in BAD_BROKER_FRAMES.values() if bad.line is not None]
            unlogged = [name for name, bad in BAD_BROKER_FRAMES.items() if bad.line is None]
            assert unlogged == ["accept-for-an-unknown-offer"]
            assert len(logged) == len(BAD_BROKER_FRAMES) - len(unlogged), runner.output
            for (level, start), (seen_level, message) in zip(expected, logged, strict=True):
                assert (seen_level, message[: len(start)]) == (level, start), message

            # The frames answered over the protocol, each with exactly one answer.
            answers = [
                (m["type"], m["taskId"])
                for m in runner_messages(core, runner_id)
                if m.get("taskId") in ("t-x", "t-y", "t-z", "t")
            ]
            assert answers == [("runner:taskrejected", "t-x"), ("runner:taskerror", "t-y")]
            answered = {name: bad.answer for name, bad in BAD_BROKER_FRAMES.items() if bad.answer}
            assert answered == {
                "accept-for-an-unknown-offer": "runner:taskrejected",
                "settings-for-an-unknown-task": "runner:taskerror",
            }

            # A frame over the runner's limit: it drops the connection and comes back.
            connection.send_frame('{"type": "broker:drain", "pad": "' + "a" * MAX_PAYLOAD + '"}')

            def reconnected() -> bool:
                current = core.connection(runner_id)
                return (
                    current is not None
                    and current is not connection
                    and runner_id in core.runner_ids()
                )

            await until(reconnected, what="the runner to reconnect after an oversized frame")
            # The broker sees the new connection before the runner's line about it is
            # read from its output: wait for the line, then there are exactly two.
            await until(
                lambda: len(re.findall(r"Connected to broker", runner.output)) >= 2,
                what="the runner's second 'Connected to broker'",
            )
            assert len(re.findall(r"Connected to broker", runner.output)) == 2
            second = submit(core, "return 'served after reconnecting'")
            assert (await finished(second))["result"] == "served after reconnecting"
            assert len(completions(core, second.task_id)) == 1
        finally:
            assert await runner.aclose() == 0, runner.output


async def test_lone_surrogates_travel_through_broker_runner_and_agent_intact() -> None:
    # "\ud800" is valid JSON: such text reaches the broker from any API caller. It
    # used to make the broker's frame to the runner unsendable (the runner's
    # connection was poisoned for everyone); now it runs like any other text.
    async with start_broker() as running:  # message_log off: it re-serializes frames
        runner = RunnerProcess(running.url)
        try:
            await runner.wait_connected(running.broker)
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:

                async def run(code: str) -> dict[str, Any]:
                    body = json.dumps(
                        {"code": code, "items": [{"json": {"k\udfff": "\ud800"}}]},
                        ensure_ascii=True,
                    )
                    response = await http.post(
                        "/v1/tasks?wait=30",
                        content=body.encode(),
                        headers={"content-type": "application/json"},
                    )
                    assert response.status_code == 200, response.text
                    document: dict[str, Any] = response.json()
                    return document

                assert (await run("return _items"))["result"] == [{"json": {"k\udfff": "\ud800"}}]
                assert (await run("return '\\ud800x'"))["result"] == "\ud800x"
                printed = await run("print('\\udfff')\nreturn 1")
                assert printed["prints"] == [["'\udfff'"]]
                assert (await run("return 'next'"))["result"] == "next"
            assert runner.process.poll() is None
        finally:
            assert await runner.aclose() == 0, runner.output
