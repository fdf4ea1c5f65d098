"""n8n's own integration suite (reference 10.1), re-run against our embedded broker and
`sandbox-runner serve` over real sockets, with every task in a real container. Each
behaviour is asserted on the wire messages the runner sent.

The whole suite runs once per engine (``SANDBOX_BACKEND``: Docker, and an OCI runtime
driven directly): one runner process per engine serves the module's tasks, and the
runners with other configurations are started on each engine too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from helpers import until

from runner.broker_server.server import RunningBroker

from .conftest import BACKENDS
from .harness import (
    RunnerProcess,
    completions,
    finished,
    start_broker,
    submit,
    wire,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("task_image")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def broker() -> AsyncIterator[RunningBroker]:
    async with start_broker() as running:
        running.broker.log_messages = True
        yield running


async def _runner(
    broker: RunningBroker, env: dict[str, str] | None = None
) -> AsyncIterator[RunnerProcess]:
    runner = RunnerProcess(broker.url, env)
    try:
        await runner.wait_connected(broker.broker)
        yield runner
    finally:
        await runner.aclose()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The engine of the module's runner: module-wide, so one runner serves each engine's
    share of the tests."""
    name: str = request.param
    return name


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(broker: RunningBroker, backend: str) -> AsyncIterator[RunnerProcess]:
    async for process in _runner(broker, {"SANDBOX_BACKEND": backend}):
        yield process


async def run_on(
    broker: RunningBroker,
    runner_id: str,
    code: str,
    items: list[Any] | None = None,
    mode: str = "all_items",
    **kw: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Submit and wait; check it ran on ``runner_id``; return the document and the wire."""
    task = submit(broker.broker, code, items, mode, **kw)
    document = await finished(task)
    assert task.runner_id == runner_id, (task.runner_id, runner_id)
    return document, wire(broker.broker, task.task_id)


def done_of(messages: list[dict[str, Any]]) -> dict[str, Any]:
    (done,) = [m for m in messages if m["type"] in ("runner:taskdone", "runner:taskerror")]
    return done


ITEMS = [{"json": {"a": 1}}, {"json": {"a": 2}}, {"json": {"a": 3}}]


# -- the default runner ---------------------------------------------------------------


async def test_all_items_with_success(
    broker: RunningBroker, runner: RunnerProcess, backend: str
) -> None:
    document, messages = await run_on(broker, runner.runner_id, "return [{'x': 1}, 5]", ITEMS)
    assert done_of(messages)["data"] == {"result": [{"x": 1}, 5]}
    assert document["status"] == "success"
    assert document["audit"]["containerId"]
    assert document["audit"]["isolation"]["backend"] == backend
    assert [m["type"] for m in messages] == ["runner:taskaccepted", "runner:taskdone"]


async def test_each_task_is_one_audit_line_naming_both_runner_ids(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    task = submit(broker.broker, "return 1")
    document = await finished(task)

    def audit_lines() -> list[dict[str, Any]]:
        lines = [line for line in runner.lines if " runner.audit: " in line]
        records = [json.loads(line.split(" runner.audit: ", 1)[1]) for line in lines]
        return [r for r in records if r.get("taskId") == task.task_id]

    (record,) = await until(audit_lines, 10, "the task's audit line")
    assert record["event"] == "task_completed"
    assert record["brokerRunnerId"] == runner.runner_id
    assert record["containerId"] == document["audit"]["containerId"]
    assert record["outcome"] == "success"
    assert record["policySha256"] == document["audit"]["policySha256"]


async def test_all_items_with_error(broker: RunningBroker, runner: RunnerProcess) -> None:
    _, messages = await run_on(broker, runner.runner_id, "raise ValueError('boom')")
    error = done_of(messages)
    assert error["type"] == "runner:taskerror"
    assert error["error"]["message"] == "boom"
    assert "ValueError: boom" in error["error"]["description"]
    assert error["sandbox"]["code"] == "user_error"


async def test_all_items_with_continue_on_fail(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    _, messages = await run_on(
        broker, runner.runner_id, "raise KeyError('k')", continue_on_fail=True
    )
    assert done_of(messages)["data"] == {"result": [{"json": {"error": "'k'"}}]}


async def test_per_item_with_success(broker: RunningBroker, runner: RunnerProcess) -> None:
    _, messages = await run_on(
        broker, runner.runner_id, "return {'b': _item['json']['a']}", ITEMS[:2], "per_item"
    )
    assert done_of(messages)["data"]["result"] == [
        {"json": {"b": 1}, "pairedItem": {"item": 0}},
        {"json": {"b": 2}, "pairedItem": {"item": 1}},
    ]


async def test_per_item_with_explicit_json_and_binary(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    code = "return {'json': {'v': 1}, 'binary': {'f': {'data': 'AA=='}}, 'extra': 1}"
    _, messages = await run_on(broker, runner.runner_id, code, ITEMS[:1], "runOnceForEachItem")
    assert done_of(messages)["data"]["result"] == [
        {"json": {"v": 1}, "pairedItem": {"item": 0}, "binary": {"f": {"data": "AA=="}}}
    ]


async def test_per_item_with_binary_only(broker: RunningBroker, runner: RunnerProcess) -> None:
    _, messages = await run_on(
        broker, runner.runner_id, "return {'binary': {'f': {}}}", ITEMS[:1], "per_item"
    )
    assert done_of(messages)["data"]["result"] == [
        {"json": {}, "pairedItem": {"item": 0}, "binary": {"f": {}}}
    ]


async def test_per_item_with_filtering(broker: RunningBroker, runner: RunnerProcess) -> None:
    code = "return None if _item['json']['a'] == 1 else _item"
    _, messages = await run_on(broker, runner.runner_id, code, ITEMS, "per_item")
    assert [i["pairedItem"]["item"] for i in done_of(messages)["data"]["result"]] == [1, 2]


async def test_per_item_with_continue_on_fail(broker: RunningBroker, runner: RunnerProcess) -> None:
    code = "return {'v': 1 / (_item['json']['a'] - 2)}"
    _, messages = await run_on(
        broker, runner.runner_id, code, ITEMS, "per_item", continue_on_fail=True
    )
    assert done_of(messages)["data"] == {"result": [{"json": {"error": "division by zero"}}]}


async def test_datetime_and_time_parsing_work_with_the_default_allowlist(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    code = (
        "import datetime, time\n"
        "d = datetime.datetime.strptime('2024-01-02', '%Y-%m-%d')\n"
        "return [{'d': d.strftime('%d.%m.%Y'), 't': time.strptime('10:30', '%H:%M').tm_min}]"
    )
    _, messages = await run_on(broker, runner.runner_id, code)
    assert done_of(messages)["data"]["result"] == [{"d": "02.01.2024", "t": 30}]


BYPASS = "is disallowed, because it can be used to bypass security restrictions."


@pytest.mark.parametrize(
    ("code", "violation"),
    [
        ("return globals()['__builtins__']", "Access to name '__builtins__'"),
        ("return locals()['__builtins__']", "Access to name '__builtins__'"),
        ("return __builtins__['__import__']('os')", "Access to attribute '__import__'"),
        (
            "return __builtins__['__spec__'].loader.load_module('os')",
            "Access to attribute '__spec__'",
        ),
        (
            "return '{.__builtins__[__import__]}'.format(print)",
            "String pattern accessing '__builtins__'",
        ),
    ],
    ids=["globals", "locals", "builtins-dict-import", "builtins-spec-loader", "format-string"],
)
async def test_bypass_attempts_are_refused(
    broker: RunningBroker, runner: RunnerProcess, code: str, violation: str
) -> None:
    _, messages = await run_on(broker, runner.runner_id, code)
    error = done_of(messages)
    assert error["type"] == "runner:taskerror"
    # Refused by the analyzer, before any container: not merely "some error".
    assert error["sandbox"]["code"] == "security_violation"
    assert error["sandbox"]["stage"] == "analyze"
    text = error["error"]["message"] + "\n" + error["error"].get("description", "")
    assert "Security violations detected" in text, text
    assert f"Line 1: {violation} {BYPASS}" in text, text


async def test_prints_ride_in_the_completion_for_our_broker(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    """Our broker lists sandbox-prints: one frame per task, no rpc per print call
    (n8n, which does not, gets n8n's rpcs: tests/unit/test_protocol_machine.py)."""
    code = (
        "print('Hello, World!', 42, 3.14, True, None)\n"
        "print({'a': [1]}, [1, 'x'])\n"
        "print('unicode: ü ✓ 🎉')\n"
        "print()\n"
        "print([], {})\n"
        "return 1"
    )
    document, messages = await run_on(broker, runner.runner_id, code)
    assert [m for m in messages if m["type"] == "runner:rpc"] == []
    expected = [
        ["'Hello, World!'", "42", "3.14", "True", "None"],
        ['{"a": [1]}', '[1, "x"]'],
        ["'unicode: ü ✓ 🎉'"],
        [],
        ["[]", "{}"],
    ]
    assert done_of(messages)["sandbox"]["prints"] == expected
    assert document["prints"] == expected


async def test_prints_are_sent_on_failure_too(broker: RunningBroker, runner: RunnerProcess) -> None:
    document, messages = await run_on(
        broker, runner.runner_id, "print('before')\nraise RuntimeError('x')"
    )
    error = done_of(messages)
    assert error["type"] == "runner:taskerror"
    assert error["sandbox"]["prints"] == [["'before'"]]
    assert document["prints"] == [["'before'"]]


async def test_timeout_during_execution(broker: RunningBroker, runner: RunnerProcess) -> None:
    _, messages = await run_on(broker, runner.runner_id, "while True:\n    pass")
    error = done_of(messages)
    assert error["error"]["message"] == "Task execution timed out after 2 seconds"


async def test_cancel_during_execution(broker: RunningBroker, runner: RunnerProcess) -> None:
    task = submit(broker.broker, "import time\ntime.sleep(30)\nreturn 1")
    await until(lambda: task.status == "running", 10, "the task to start")
    await asyncio.sleep(0.3)
    broker.broker.cancel(task)
    await until(lambda: completions(broker.broker, task.task_id), 15, "the runner's answer")
    assert completions(broker.broker, task.task_id) == [
        {
            "type": "runner:taskerror",
            "taskId": task.task_id,
            "error": {"message": "Task was cancelled"},
            "sandbox": completions(broker.broker, task.task_id)[0]["sandbox"],
        }
    ]


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"d": value}
    return value


async def test_input_as_deep_as_the_broker_allows_runs_and_comes_back(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    deepest = nested(128)  # MAX_INPUT_DEPTH: the broker's limit for query and items
    document, _ = await run_on(
        broker,
        runner.runner_id,
        "return [{'json': {'query': _query, 'item': _items[0]['json']}}]",
        [{"json": deepest}],
        query=deepest,
    )
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"query": deepest, "item": deepest}}]


async def test_input_too_deep_is_refused_before_any_runner_sees_it(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    # It used to be accepted, then fail to encode at dispatch: the runner held the
    # slot waiting for settings until the broker's timer (timeout + grace) fired.
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as http:
        response = await http.post("/v1/tasks", json={"code": "return 1", "query": nested(300)})
        assert response.status_code == 422
        assert "query nests deeper than 128 levels" in response.json()["detail"]
        # and the runner's slots are all free for the next task
        document = (
            await http.post("/v1/tasks?wait=30", json={"code": "return [{'json': {'ok': 1}}]"})
        ).json()
    assert document["status"] == "success", document


async def test_an_output_schema_is_checked_in_a_schema_worker(
    broker: RunningBroker, runner: RunnerProcess
) -> None:
    # 1,500 values: more than the broker checks inline; its schema workers do.
    schema = {"items": {"type": "integer"}}
    async with httpx.AsyncClient(base_url=broker.url, timeout=60) as http:
        bad = {"code": "return list(range(1500)) + ['x']", "outputSchema": schema}
        document = (await http.post("/v1/tasks?wait=30", json=bad)).json()
        good = {"code": "return list(range(1500))", "outputSchema": schema}
        ok = (await http.post("/v1/tasks?wait=30", json=good)).json()
    assert document["status"] == "error", document
    assert document["error"]["code"] == "output_schema_violation"
    assert document["error"]["description"] == "result[1500]: 'x' is not of type 'integer'"
    assert ok["status"] == "success", ok
    assert ok["result"] == list(range(1500))
    assert broker.driver.schemas.started >= 1


async def test_health_check(runner: RunnerProcess) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{runner.health_port}/anything")
    assert (response.status_code, response.text) == (200, "OK")


async def test_bad_frames_unknown_types_and_bad_settings_get_clear_errors(
    broker: RunningBroker, runner: RunnerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = broker.broker
    connection = core.connection(runner.runner_id)
    assert connection is not None
    # The task below is handed out by hand: this broker must not tell the runner to
    # drop it as unknown (what it does for a late or unknown acceptance).
    real_send = connection.send

    def send(message: Any) -> None:
        if getattr(message, "task_id", None) != "manual-1":
            real_send(message)

    monkeypatch.setattr(connection, "send", send)
    for frame in ["this is not json", "[1, 2]", '{"type": "broker:nodetypes"}', '{"no": "type"}']:
        connection.send_frame(frame)  # type: ignore[attr-defined]
    # Take one of the runner's live offers by hand, then send settings missing "code".
    offers = [
        m
        for rid, m in core.message_log
        if rid == runner.runner_id and m["type"] == "runner:taskoffer"
    ]
    offer_id = offers[-1]["offerId"]
    core._runners.get(runner.runner_id).offers.pop(offer_id, None)  # keep it from real tasks
    connection.send_frame(
        json.dumps({"type": "broker:taskofferaccept", "taskId": "manual-1", "offerId": offer_id})
    )  # type: ignore[attr-defined]
    await until(lambda: wire(core, "manual-1"), 5, "the acceptance")
    connection.send_frame(
        json.dumps(
            {
                "type": "broker:tasksettings",
                "taskId": "manual-1",  # type: ignore[attr-defined]
                "settings": {"nodeMode": "runOnceForAllItems", "items": []},
            }
        )
    )
    await until(lambda: len(wire(core, "manual-1")) == 2, 5, "the task error")
    assert wire(core, "manual-1") == [
        {"type": "runner:taskaccepted", "taskId": "manual-1"},
        {
            "type": "runner:taskerror",
            "taskId": "manual-1",
            "error": {
                "message": "Missing field in task settings message: 'code'",
                "description": "",
            },
        },
    ]
    # The runner keeps serving.
    document, _ = await run_on(broker, runner.runner_id, "return 'still here'")
    assert document["result"] == "still here"


# -- runners with other configurations -------------------------------------------------


async def test_stdlib_wildcard_runner(backend: str) -> None:
    async with start_broker() as running:
        running.broker.log_messages = True
        env = {"N8N_RUNNERS_STDLIB_ALLOW": "*", "SANDBOX_BACKEND": backend}
        async for process in _runner(running, env):
            code = (
                "from collections.abc import Iterable\n"
                "import warnings\n"
                "warnings.warn('careful')\n"
                "return isinstance([], Iterable)"
            )
            _, messages = await run_on(running, process.runner_id, code)
            assert done_of(messages)["data"] == {"result": True}
            sys_spec = "import sys\nreturn sys.__builtins__['__spec__'].loader.load_module('os')"
            _, messages = await run_on(running, process.runner_id, sys_spec)
            error = done_of(messages)
            assert error["type"] == "runner:taskerror"
            # `sys` is allowed with `*`; the dunder walk is still the analyzer's to refuse.
            assert error["sandbox"]["code"] == "security_violation"
            assert f"Line 2: Access to name '__spec__' {BYPASS}" in error["error"]["description"]


@pytest.mark.parametrize("blocked", [True, False], ids=["env-blocked", "env-allowed"])
async def test_environment_access(blocked: bool, backend: str) -> None:
    env = {
        "N8N_RUNNERS_STDLIB_ALLOW": "os",
        "N8N_BLOCK_RUNNER_ENV_ACCESS": str(blocked).lower(),
        "SANDBOX_BACKEND": backend,
    }
    code = (
        "import os\n"
        "return {'path': 'PATH' in os.environ, 'home': 'HOME' in os.environ, 'n': len(os.environ)}"
    )
    seen = {}
    async with start_broker() as running:
        running.broker.log_messages = True
        async for process in _runner(running, env):
            for mode in ("all_items", "per_item"):  # one runner for both modes
                _, messages = await run_on(running, process.runner_id, code, [{"json": {}}], mode)
                result = done_of(messages)["data"]["result"]
                seen[mode] = result if mode == "all_items" else result[0]["json"]
    assert set(seen) == {"all_items", "per_item"}
    for values in seen.values():
        if blocked:
            assert values == {"path": False, "home": False, "n": 0}
        else:
            assert values["path"] is True
            assert values["n"] > 0
