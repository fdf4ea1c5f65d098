"""Way (a) of ``make bench``, the forkserver baseline (``bench/forkserver/``).

A baseline is honest when it is the real thing and runs the same code as what it is
compared with: one long-lived process that forks a child per task (not a process
spawned per task), many tasks at once, and, task for task, the outcome the agent
itself gives (here the agent spawned as a host process, ``ProcessSandbox``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.forkserver import ForkserverSandbox
from runner.analyzer import DEFAULT_BUILTINS_DENY
from runner.errors import InfrastructureError
from runner.policy import load_bundle
from runner.sandbox.base import ExecutionResult, GuardConfig, Limits, Mode, Outcome, TaskSpec
from runner.sandbox.process import ProcessSandbox
from runner.settings import PROJECT_ROOT

IMAGE_DIR = PROJECT_ROOT / "sandbox_image"
STDLIB_ALLOW = load_bundle(PROJECT_ROOT / "policies").config.imports.stdlib_allow
GUARDS = GuardConfig(
    stdlib_allow=tuple(STDLIB_ALLOW),
    external_allow=(),
    builtins_deny=DEFAULT_BUILTINS_DENY,
)
ITEMS = [{"json": {"a": 1}}, {"json": {"a": 2}}]


@pytest.fixture
async def forkserver() -> AsyncIterator[ForkserverSandbox]:
    sandbox = await ForkserverSandbox.start(IMAGE_DIR)
    try:
        yield sandbox
    finally:
        await sandbox.aclose()


def spec(
    code: str,
    *,
    mode: Mode = Mode.ALL_ITEMS,
    guards: GuardConfig = GUARDS,
    items: Any = None,
    task_id: str = "t",
) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        code=code,
        mode=mode,
        items=ITEMS if items is None else items,
        guards=guards,
    )


def processes_running(script: str) -> list[int]:
    """Live processes running ``script``: the server and its forked children (zombies,
    whose command line is empty, are dead already)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if script.encode() in argv:
            found.append(int(entry))
    return found


def seen(result: ExecutionResult) -> tuple[Any, ...]:
    """What a user sees of a result (timings and the agent's run time aside)."""
    verdict = result.details.get("verdictSource")
    return result.outcome, result.result, result.error, result.prints, verdict


CASES = {
    "success": ("return [{'json': {'sum': sum(i['json']['a'] for i in _items)}}]", {}),
    "per-item": ("return {'double': _item['json']['a'] * 2}", {"mode": Mode.PER_ITEM}),
    "prints": ("print('hi', 1, {'k': [1]})\nreturn []", {}),
    "user-error": ("raise ValueError('no good')", {}),
    "system-exit": ("raise SystemExit(3)", {}),
    "not-json": ("return [{'json': {'s': {1, 2}}}]", {}),
    "analysis-refusal": ("import os\nreturn []", {}),
    "syntax-error": ("return (", {}),
    "runtime-guard": ("return [{'json': {'x': ().__class__.__base__.__subclasses__()}}]", {}),
    "print-flood": ("for i in range(100000):\n    print('x' * 100)\nreturn []", {}),
    "timeout": ("while True:\n    pass", {"timeout_s": 1.0}),
}


@pytest.mark.parametrize(("code", "options"), CASES.values(), ids=CASES.keys())
async def test_the_forkserver_gives_the_outcome_the_agent_gives(
    forkserver: ForkserverSandbox, code: str, options: dict[str, Any]
) -> None:
    limits = Limits(timeout_s=options.get("timeout_s", 10.0), output_bytes=64 * 1024)
    task = spec(code, mode=options.get("mode", Mode.ALL_ITEMS))
    spawned = ProcessSandbox(IMAGE_DIR)
    try:
        expected = await spawned.run(task, limits)
    finally:
        await spawned.aclose()

    got = await forkserver.run(task, limits)

    assert seen(got) == seen(expected)


async def test_one_server_forks_a_fresh_child_for_every_task(
    forkserver: ForkserverSandbox,
) -> None:
    ask = spec(
        "import os\nreturn [{'json': {'pid': os.getpid(), 'parent': os.getppid()}}]",
        guards=GuardConfig(stdlib_allow=("os",), external_allow=(), builtins_deny=()),
    )
    answers = [await forkserver.run(ask, Limits()) for _ in range(3)]

    assert [a.outcome for a in answers] == [Outcome.SUCCESS] * 3
    children = [a.result[0]["json"] for a in answers]  # type: ignore[index]
    # Every task in a process of its own, each forked by the same long-lived server.
    assert len({child["pid"] for child in children}) == 3
    assert {child["parent"] for child in children} == {forkserver.pid}
    assert forkserver.pid not in {child["pid"] for child in children}


async def test_a_task_is_answered_while_another_still_runs(
    forkserver: ForkserverSandbox,
) -> None:
    slow = asyncio.create_task(
        forkserver.run(spec("import time\ntime.sleep(60)\nreturn []"), Limits(timeout_s=60))
    )
    fast = asyncio.create_task(forkserver.run(spec("return []"), Limits()))

    done, _ = await asyncio.wait({slow, fast}, return_when=asyncio.FIRST_COMPLETED)

    assert done == {fast}
    assert fast.result().outcome is Outcome.SUCCESS
    # Closing the sandbox ends the server, which kills the task still running.
    script = forkserver.script
    assert processes_running(script)  # the server and the sleeping child
    await forkserver.aclose()
    with pytest.raises(InfrastructureError, match="forkserver exited"):
        await slow
    for _ in range(100):  # SIGKILL was sent; wait (boundedly) for it to be done
        if not processes_running(script):
            break
        await asyncio.sleep(0.1)
    assert not processes_running(script)


async def test_a_cancelled_task_ends_cancelled_its_child_is_killed_and_the_server_serves_on(
    forkserver: ForkserverSandbox,
) -> None:
    script = forkserver.script
    running = asyncio.create_task(
        forkserver.run(spec("while True:\n    pass", task_id="t1"), Limits(timeout_s=60))
    )
    for _ in range(500):  # until the server has forked the task's child
        if len(processes_running(script)) == 2:
            break
        await asyncio.sleep(0.01)
    (child,) = set(processes_running(script)) - {forkserver.pid}

    assert await forkserver.cancel("t1") is True
    result = await running

    assert result.outcome is Outcome.CANCELLED
    assert result.error is not None
    assert result.error.message == "Task was cancelled"
    assert processes_running(script) == [forkserver.pid]  # answered once reaped
    assert child not in processes_running(script)
    assert await forkserver.cancel("t1") is False  # finished: nothing left to stop
    again = await forkserver.run(spec("return []", task_id="t2"), Limits())
    assert again.outcome is Outcome.SUCCESS


async def test_a_dead_server_is_an_infrastructure_fault(forkserver: ForkserverSandbox) -> None:
    os.kill(forkserver.pid, signal.SIGKILL)

    with pytest.raises(InfrastructureError, match="forkserver"):
        await forkserver.run(spec("return []"), Limits())


def test_the_ratios_are_against_the_forkserver_and_the_spawned_agent_is_an_extra_line() -> None:
    from bench import run

    p50 = {"forkserver": 5.0, "spawn": 75.0, "bare": 240.0, "cold": 200.0, "warm": 12.0}
    rate = {"forkserver": 200.0, "spawn": 25.0, "bare": 8.0, "cold": 6.0, "warm": 6.0}
    results: dict[str, Any] = {
        "latencyMs": {way: {"n": 30, "p50": ms, "p95": ms * 1.2} for way, ms in p50.items()},
        "throughputPerS": {way: {"4": r} for way, r in rate.items()},
        "meta": {
            "finishedAt": "2026-01-01T00:00:00+00:00",
            "host": {"cpus": 2, "docker": "x", "runtime": "runc", "cgroup": "1", "kernel": "k"},
            "durationS": 5.0,
            "poolSize": 2,
            "refillConcurrency": 2,
            "otherContainersSeen": 0,
        },
    }
    results.update(run.evaluate(results))

    ratios = results["ratios"]
    assert ratios["latencyP50VsForkserver"]["warm"] == 2.4
    assert ratios["latencyP50VsForkserver"]["spawn"] == 15.0
    assert ratios["throughputVsForkserver"]["4"]["warm"] == 0.03
    rows = [line for line in run.markdown(results).splitlines() if line.startswith("| (")]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| {run.WAY[way].label}" for way in ("forkserver", "spawn", "bare", "cold", "warm")
    ]
    assert rows[1].startswith("| (a') agent spawned per task on the host")
