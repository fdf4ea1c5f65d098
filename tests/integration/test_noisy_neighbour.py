"""Tenant A attacks, tenant B keeps being served: judged by ordering, not by timing.

Against ``sandbox-runner up`` (the embedded broker and one runner sharing one event
loop, as the issue's report tried it) with two API keys. A's imports are not limited
(``SANDBOX_STDLIB_ALLOW=*``): the container is the wall, so every attack is mounted for
real instead of being stopped by the analyzer.

For each of A's attacks: A first starts a *sentinel* task that sleeps
:data:`SENTINEL_S` seconds; once it runs, A mounts the attack, and B then runs
trivial tasks one after the other, up to :data:`B_DURING` while the attack goes on
and :data:`B_TASKS` after it ended. Every one of B's must succeed while A's sentinel
is still running (then it is cancelled). A stall of the shared event loop (2,000,000
print frames, 8 MB of code parsed on the loop, a 40 MB body) would hold B's tasks
for tens of seconds, past the sentinel: the ordering fails. Each attack's own outcome is
checked too, and after all of them the process's memory stays under
:data:`RSS_BOUND_MIB` (docs/reliability.md). All of it once per engine
(``SANDBOX_BACKEND``: Docker, and an OCI runtime driven directly), one ``up`` each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from bench.neighbour import (
    FORGED_VERDICT,
    HEAVY_CODE,
    JOIN_AGENT_GROUP,
    KILL_THE_AGENT,
    PRINT_FLOOD,
    TRIVIAL,
    A,
    B,
    up_env,
)
from runner.testing import UpProcess

from .conftest import BACKENDS

pytestmark = pytest.mark.timeout(600)

SENTINEL_S = 20
SENTINEL = f"import time\ntime.sleep({SENTINEL_S})\nreturn 'sentinel'"
# B's tasks while the attack runs (at most) and after it has ended: even on a loaded
# 2-core machine (~1 s each) all of them end well inside the sentinel's 20 s.
B_DURING = 6
B_TASKS = 3
# The flood of the item 1, large enough that the stall it caused on b3a21b2
# (one rpc frame per entry on the shared loop: ~20 us each) outlasts the sentinel.
BIG_PRINT_FLOOD = PRINT_FLOOD.replace("300_000", "2_000_000")
# The `up` process (broker + runner) after every attack, analysis workers not counted:
# ~70 MiB idle; the bound leaves room for allocator high-water marks, not for copies
# of a 16 MiB body or of 300,000 print entries (each of those alone took gigabytes).
RSS_BOUND_MIB = 200


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The engine of the module's ``up``: module-wide, every attack on one process."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def up(backend: str) -> Iterator[UpProcess]:
    process = UpProcess(
        {
            **up_env(),
            "SANDBOX_RUNNER_ID": f"pytest-noisy-neighbour-{backend}",
            "SANDBOX_MEMORY_MB": "1024",
            "SANDBOX_BACKEND": backend,
        },
        keep_lines=2000,
    )
    yield process
    process.stop()


async def document_of(client: httpx.AsyncClient, response: httpx.Response) -> dict[str, Any]:
    """Wait (long-poll) until a submitted task has its result document."""
    headers = {"Authorization": response.request.headers["Authorization"]}
    while response.status_code == 202:
        task_id = response.json()["taskId"]
        response = await client.get(f"/v1/tasks/{task_id}", params={"wait": 30}, headers=headers)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


class Mounted:
    """An attack A has mounted: whether it has ended, and the check of how it ended."""

    def __init__(
        self, client: httpx.AsyncClient, response: httpx.Response | None, check: Checker
    ) -> None:
        self._client = client
        self._response = response
        self._check = check

    async def has_ended(self) -> bool:
        if self._response is None:  # refused at the edge: ended as it was mounted
            return True
        task_id = self._response.json()["taskId"]
        state = await self._client.get(f"/v1/tasks/{task_id}", headers=A)
        return state.status_code == 200

    async def judge(self) -> None:
        if self._response is not None:
            self._check(await document_of(self._client, self._response))


Checker = Callable[[dict[str, Any]], None]
Attack = Callable[[httpx.AsyncClient], Awaitable[Mounted]]


def runs(code: str, check: Checker, **fields: Any) -> Attack:
    """An attack that is a task: submitted without waiting; ``check`` judges its end."""

    async def mount(client: httpx.AsyncClient) -> Mounted:
        response = await client.post("/v1/tasks", json={"code": code, **fields}, headers=A)
        assert response.status_code == 202, response.text
        return Mounted(client, response, check)

    return mount


def refused(status: int, fragment: str, **request: Any) -> Attack:
    """An attack the edge refuses with a clear status."""

    async def mount(client: httpx.AsyncClient) -> Mounted:
        headers = {**A, **request.pop("headers", {})}
        response = await client.post("/v1/tasks", headers=headers, **request)
        assert response.status_code == status, response.text
        assert fragment in response.text, response.text
        return Mounted(client, None, lambda document: None)

    return mount


def flooded(document: dict[str, Any]) -> None:
    assert document["status"] == "success", document
    assert document["result"] == "flooded"
    assert len(document["prints"]) <= 101  # 100 kept + n8n's truncation marker


def forged(document: dict[str, Any]) -> None:
    # The child's claim is its own word: never the analyzer's stage.
    assert document["status"] == "error", document
    assert document["error"]["stage"] != "analyze", document["error"]


def timed_out(document: dict[str, Any]) -> None:
    assert document["error"]["code"] == "timeout", document
    assert document["error"]["message"] == "Task execution timed out after 3 seconds"


def blamed(document: dict[str, Any]) -> None:
    assert document["error"]["code"] == "crashed", document
    assert "Task killed its supervising agent" in document["error"]["message"]


def heavy(document: dict[str, Any]) -> None:
    assert document["status"] == "success", document
    assert document["result"] == 36_000


ATTACKS: dict[str, Attack] = {
    # Room for the child to build 2,000,000 entries: what reaches the host is the test.
    "1 print flood on the result pipe": runs(BIG_PRINT_FLOOD, flooded, memoryMb=1024),
    "2 cpus that round to nothing": refused(422, "cpus", json={"code": "return 1", "cpus": 1e-10}),
    "3 8 MB of code": refused(422, "code", json={"code": "x = 1\n" * 1_400_000}),
    "3 code at the ceiling, expensive to parse": runs(HEAVY_CODE, heavy),
    "4 a forged analyzer verdict": runs(FORGED_VERDICT, forged),
    "4 the task kills its agent": runs(KILL_THE_AGENT, blamed, timeoutSeconds=10),
    "5 timeout evasion in the agent's group": runs(JOIN_AGENT_GROUP, timed_out, timeoutSeconds=3),
    "7 a 40 MB body": refused(
        413,
        "SANDBOX_MAX_REQUEST_BYTES",
        content=b'{"code": "' + b"x" * 40_000_000 + b'"}',
        headers={"content-type": "application/json"},
    ),
    "7 a query nested 300 deep": refused(
        422, "deeper than 128 levels", json={"code": "return 1", "query": nested(300)}
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_b_is_served_while_a_attacks(up: UpProcess, name: str, backend: str) -> None:
    async with httpx.AsyncClient(base_url=up.url, timeout=120) as client:
        sentinel = await client.post("/v1/tasks", json={"code": SENTINEL}, headers=A)
        assert sentinel.status_code == 202, sentinel.text
        sentinel_id = sentinel.json()["taskId"]
        for _ in range(200):
            state = await client.get(f"/v1/tasks/{sentinel_id}", headers=A)
            if state.json().get("status") == "running":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"A's sentinel never started: {state.text}")

        attack = await ATTACKS[name](client)
        served = 0

        async def serve_b() -> None:
            nonlocal served
            answer = await client.post(
                "/v1/tasks",
                params={"wait": 60},
                json={"code": TRIVIAL, "items": [{"n": served}, {"n": 1}]},
                headers=B,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"] == [{"json": {"n": served + 1}}], answer.text
            assert answer.json()["audit"]["isolation"]["backend"] == backend
            served += 1

        # B is served along the attack, and right after it (when A's result is
        # handled: a print flood used to stall the loop then, one frame per entry).
        for _ in range(B_DURING):
            if await attack.has_ended():
                break
            await serve_b()
        for _ in range(B_TASKS):
            await serve_b()
        # The ordering: every one of B's tasks ended while A's sentinel still ran.
        state = await client.get(f"/v1/tasks/{sentinel_id}", headers=A)
        assert state.status_code == 202, (
            f"A's sentinel ended before B was served ({served} of B's tasks): {state.text}"
        )
        assert state.json()["status"] == "running"
        cancelled = await client.delete(f"/v1/tasks/{sentinel_id}", headers=A)
        assert cancelled.json()["error"]["code"] == "cancelled"
        await attack.judge()


def test_memory_stays_bounded_after_every_attack(up: UpProcess) -> None:
    # Runs after the attacks (file order); alone, it shows the idle figure.
    rss = up.rss_mib()
    assert rss < RSS_BOUND_MIB, f"sandbox-runner up holds {rss} MiB after the attacks"
    print(json.dumps({"upRssMiB": rss}))
