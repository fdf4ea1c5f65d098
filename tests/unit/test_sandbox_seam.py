"""The ``Sandbox`` seam is whole: every implementation has all of it, and the service
uses nothing else (a cancel from the broker reaches the sandbox through ``cancel``).

Docker's and the OCI runtime's ``cancel`` are exercised against real containers in
tests/integration; here, the agent as a host process (``ProcessSandbox``) and the
fakes of the unit tests.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import until

from runner.analyzer import DEFAULT_BUILTINS_DENY, Analyzer, ImportPolicy
from runner.pipeline import AuditContext, TaskPipeline
from runner.policy import load_bundle
from runner.sandbox.base import (
    CANCELLED_MESSAGE,
    ExecutionResult,
    GuardConfig,
    Limits,
    Mode,
    Outcome,
    Sandbox,
    TaskSpec,
    cancelled_result,
)
from runner.sandbox.process import ProcessSandbox
from runner.service import RunnerService
from runner.settings import PROJECT_ROOT, Settings

IMAGE_DIR = PROJECT_ROOT / "sandbox_image"
GUARDS = GuardConfig(
    stdlib_allow=tuple(load_bundle(PROJECT_ROOT / "policies").config.imports.stdlib_allow),
    external_allow=(),
    builtins_deny=DEFAULT_BUILTINS_DENY,
)

# Every implementation of the seam: "module:Class" (test modules by their import name).
IMPLEMENTATIONS = [
    "runner.sandbox.container:ContainerSandbox",
    "runner.sandbox.docker:DockerSandbox",
    "runner.sandbox.oci.sandbox:OciSandbox",
    "runner.sandbox.process:ProcessSandbox",
    "bench.forkserver.sandbox:ForkserverSandbox",
    "test_metrics:StubSandbox",
    "test_selfcheck:CanarySandbox",
    "test_analysis_pool:InstantSandbox",
    "test_sandbox_seam:BlockingSandbox",
]


def protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(Sandbox).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def test_the_seam_is_run_cancel_and_aclose() -> None:
    assert set(protocol_methods()) == {"run", "cancel", "aclose"}


@pytest.mark.parametrize("where", IMPLEMENTATIONS)
def test_every_sandbox_implements_the_whole_seam(where: str) -> None:
    module, name = where.split(":")
    implementation = getattr(importlib.import_module(module), name)
    for method, expected in protocol_methods().items():
        found = getattr(implementation, method, None)
        assert found is not None, f"{name} has no {method}"
        assert inspect.iscoroutinefunction(found), f"{name}.{method} is not async"
        assert list(inspect.signature(found).parameters) == list(expected.parameters), (
            f"{name}.{method}{inspect.signature(found)} is not {method}{expected}"
        )


# -- ProcessSandbox: the agent as a host process --------------------------------------


def spec(code: str, task_id: str = "t1") -> TaskSpec:
    return TaskSpec(task_id=task_id, code=code, mode=Mode.ALL_ITEMS, items=[], guards=GUARDS)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def is_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (killed, not yet reaped by its new parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_a_cancelled_process_task_ends_cancelled_and_its_child_is_killed() -> None:
    sandbox = ProcessSandbox(IMAGE_DIR)
    try:
        running = asyncio.create_task(
            sandbox.run(spec("print('before')\nwhile True:\n    pass"), Limits(timeout_s=60))
        )
        # The task's code runs once the agent has forked its child.
        await until(
            lambda: "t1" in sandbox._running and children(sandbox._running["t1"].pid),
            what="the agent's child",
        )
        agent = sandbox._running["t1"].pid
        (child,) = children(agent)

        assert await sandbox.cancel("t1") is True
        result = await running

        assert result.outcome is Outcome.CANCELLED
        assert result.error is not None
        assert (result.error.message, result.error.has_description) == (CANCELLED_MESSAGE, False)
        await until(lambda: is_gone(child) and is_gone(agent), what="both to be dead")
        assert await sandbox.cancel("t1") is False  # finished: nothing left to stop
    finally:
        await sandbox.aclose()


async def test_a_process_cancel_for_an_unknown_task_stops_nothing() -> None:
    sandbox = ProcessSandbox(IMAGE_DIR)
    try:
        assert await sandbox.cancel("nobody") is False
        result = await sandbox.run(spec("return [{'json': {'ok': True}}]"), Limits())
        assert result.outcome is Outcome.SUCCESS  # another task is not touched
    finally:
        await sandbox.aclose()


async def test_a_cancel_that_comes_before_the_run_stops_the_task_as_it_starts() -> None:
    sandbox = ProcessSandbox(IMAGE_DIR)
    try:
        assert await sandbox.cancel("t1") is False  # not running yet
        result = await sandbox.run(spec("while True:\n    pass"), Limits(timeout_s=60))
        assert result.outcome is Outcome.CANCELLED
    finally:
        await sandbox.aclose()


# -- the service: a broker's cancel reaches the sandbox through the seam ------------------


class BlockingSandbox:
    """Runs a task until it is cancelled; records what the seam was asked."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancels: list[str] = []
        self._stop = asyncio.Event()

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        self.started.set()
        await self._stop.wait()
        return cancelled_result([["'stopped'"]])

    async def cancel(self, task_id: str) -> bool:
        self.cancels.append(task_id)
        self._stop.set()
        return True

    async def aclose(self) -> None:
        return None


async def test_a_brokers_cancel_reaches_the_sandbox_and_the_task_ends_cancelled() -> None:
    sandbox = BlockingSandbox()
    pipeline = TaskPipeline(
        sandbox=sandbox,
        analyzer=Analyzer(ImportPolicy.from_env_strings("json", "")),
        guards=GuardConfig(stdlib_allow=("json",), external_allow=(), builtins_deny=()),
        limits=Limits(),
        context=AuditContext(runner_id="seam-unit", image="local", image_id=None, isolation={}),
    )
    service = RunnerService(
        Settings(runner_id="seam-unit"),
        pipeline,
        broker_uri="http://127.0.0.1:9",
        handle_signals=False,
    )
    machine = service.machine

    def feed(**message: Any) -> None:
        machine.receive_frame(json.dumps(message))
        service._handle_events()

    def sent() -> list[dict[str, Any]]:
        return [json.loads(out.frame) for out in machine.frames_to_send()]

    machine.connection_made()
    feed(type="broker:inforequest")
    feed(type="broker:runnerregistered")
    offer = next(m for m in sent() if m["type"] == "runner:taskoffer")
    feed(type="broker:taskofferaccept", taskId="t1", offerId=offer["offerId"])
    feed(
        type="broker:tasksettings",
        taskId="t1",
        settings={"code": "return 1", "nodeMode": "runOnceForAllItems", "items": []},
    )
    await sandbox.started.wait()
    task = service._running["t1"]

    feed(type="broker:taskcancel", taskId="t1", reason="user cancelled")
    await task

    assert sandbox.cancels == ["t1"]
    errors = [m for m in sent() if m["type"] == "runner:taskerror"]
    assert [(m["taskId"], m["error"]["message"]) for m in errors] == [("t1", CANCELLED_MESSAGE)]
