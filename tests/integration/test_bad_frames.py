"""Malformed and oversized WebSocket frames, both ways, over real sockets.

Against the embedded broker: a fake runner (a raw websocket client) sends every kind
of broken frame; each is logged and ignored, its connection stays usable, an
oversized frame closes only that connection (1009), and a real runner connected
to the same broker keeps serving tasks meanwhile.

Against the runner's client: the broker sends a real `sandbox-runner serve` broken
frames (``WsRunner.send_frame``); the runner ignores them and keeps serving; an
oversized frame makes it drop the connection and reconnect by itself.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from runner.broker_server.app import WsRunner

from .harness import AUTH_TOKEN, RunnerProcess, completions, finished, start_broker, submit

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


async def grant_token(url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{url}/runners/auth", json={"token": AUTH_TOKEN})
    response.raise_for_status()
    return str(response.json()["data"]["token"])


async def receive_type(socket: ClientConnection, timeout_s: float = 5) -> str:
    return str(json.loads(await asyncio.wait_for(socket.recv(), timeout_s))["type"])


async def test_a_broker_ignores_broken_frames_closes_oversized_ones_and_keeps_serving() -> None:
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
                # Then the same connection registers normally.
                await fake.send(json.dumps({"type": "runner:info", "name": "fake", "types": []}))
                assert await receive_type(fake) == "broker:runnerregistered"
                assert FAKE_ID in core.runner_ids()

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
            await asyncio.sleep(0.2)
            assert FAKE_ID not in core.runner_ids()
            assert core.runner_ids() == [runner.runner_id]
            after = submit(core, "return 'after the oversized frame'")
            assert (await finished(after))["result"] == "after the oversized frame"
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{running.url}/healthz")).json() == {"status": "ok"}
        finally:
            assert await runner.aclose() == 0, runner.output


BAD_BROKER_FRAMES: dict[str, str] = {
    "not-json": "}{",
    "nesting-deeper-than-the-stack": "[" * 100_000,
    "array": "[]",
    "unknown-type": '{"type": "broker:surprise"}',
    "missing-fields": '{"type": "broker:taskofferaccept"}',
    "wrong-field-types": '{"type": "broker:taskofferaccept", "taskId": 1, "offerId": {}}',
    "accept-for-an-unknown-offer": '{"type": "broker:taskofferaccept", "taskId": "t-x", '
    '"offerId": "no-such-offer"}',
    "settings-for-an-unknown-task": '{"type": "broker:tasksettings", "taskId": "t-y", '
    '"settings": {"code": "return 1", "nodeMode": "runOnceForAllItems"}}',
    "cancel-for-an-unknown-task": '{"type": "broker:taskcancel", "taskId": "t-z", "reason": "x"}',
    "rpc-response": '{"type": "broker:rpcresponse", "callId": "c", "taskId": "t", "status": 1}',
}


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
            for frame in BAD_BROKER_FRAMES.values():
                connection.send_frame(frame)
            first = submit(core, "return 'served through the garbage'")
            assert (await finished(first))["result"] == "served through the garbage"
            assert runner.process.poll() is None
            assert core.connection(runner_id) is connection  # never reconnected
            # Settings for a task it never accepted get a clear error, not silence.
            errors = [
                m
                for m in runner_messages(core, runner_id)
                if m["type"] == "runner:taskerror" and m["taskId"] == "t-y"
            ]
            assert len(errors) == 1, runner_messages(core, runner_id)
            assert "Error handling message" in runner.output

            # A frame over the runner's limit: it drops the connection and comes back.
            connection.send_frame('{"type": "broker:drain", "pad": "' + "a" * MAX_PAYLOAD + '"}')
            await asyncio.sleep(0.5)
            for _ in range(200):
                current = core.connection(runner_id)
                if (
                    current is not None
                    and current is not connection
                    and runner_id in (core.runner_ids())
                ):
                    break
                await asyncio.sleep(0.1)
            assert core.connection(runner_id) is not connection, runner.output
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
