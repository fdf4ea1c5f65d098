"""Callers' schemas checked in worker processes (runner/broker_server/schema_pool.py).

Tiny checks settle inline; the rest go to a worker with the full metered budget and
give the answer an inline check gives; a check past the worker's CPU time or memory
is refused for that check only and the worker is replaced; one tenant's hostile
checks never hold the worker another tenant's check needs. Every pool is closed and
its processes are checked gone.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import nested_list

from runner.broker_server import schemas
from runner.broker_server.schema_pool import SchemaPool, SubmissionProblems
from runner.metrics import BrokerMetrics, CollectorRegistry, exposition

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


# Each level tries both branches in full: 2**depth checks without the metering.
EXPONENTIAL = {"anyOf": [{"items": {"$ref": "#"}, "minItems": 5}, {"items": {"$ref": "#"}}]}
# The metering allows 100,000 checks plus 50 per row: with 20,000 rows, 1.1 million
# checks of the costliest kind, several CPU seconds: past a 1 s CPU limit first.
CPU_BURNER = (json.dumps({"items": EXPONENTIAL}), [nested_list(25)] * 20_000)
# A result that needs a worker (more values than an inline trial takes), with one
# violation near its end.
ORDINARY = (json.dumps({"items": {"type": "integer"}}), [*range(4000), "x", 1])
ORDINARY_PROBLEM = "result[4000]: 'x' is not of type 'integer'"
CPU_REFUSAL = (
    "result: validating against the schema needed more than the 1 s of CPU time the "
    "broker allows a schema check; simplify the schema or send less data"
)


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., SchemaPool]]:
    """Pools for one test; each closed after it, with none of its processes left."""
    pools: list[SchemaPool] = []

    def make(**kw: Any) -> SchemaPool:
        pool = SchemaPool(max_payload_bytes=kw.pop("max_payload_bytes", MIB), **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pids = pool.pids()
        await pool.aclose()
        assert pool.alive == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def test_tiny_checks_settle_inline_with_no_worker(make_pool: Any) -> None:
    pool = make_pool()
    row = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    items = [{"json": {"id": 1}}, {"json": {}}]
    problems = await pool.check_submission("t", row, {"type": "integer"}, items)
    assert problems == SubmissionProblems(items=schemas.validate_input(row, items))
    assert problems.items == "items[1].json: 'id' is a required property"
    bad_schema = await pool.check_submission("t", {"type": "nonsense"}, None, [])
    assert bad_schema.schema == schemas.check_schema({"type": "nonsense"}, "inputSchema")
    assert pool.started == 0


CASES = [
    pytest.param({"required": ["id"]}, [{"json": {"id": 1}}] * 3 + [{"json": {}}], id="required"),
    pytest.param({"$ref": "#/nope"}, [{"json": 1}], id="unresolvable-ref"),
    pytest.param({"anyOf": [{"$ref": "#"}]}, [{"json": 1}], id="ref-cycle"),
    pytest.param({"items": EXPONENTIAL}, [{"json": [nested_list(30)]}], id="over-budget"),
    pytest.param({"type": "array"}, [{"json": nested_list(80)}], id="too-deep"),
    pytest.param({"type": "object"}, [{"a": n} for n in range(1500)], id="plain-objects-ok"),
]


@pytest.mark.parametrize(("schema", "items"), CASES)
async def test_a_worker_answers_what_the_inline_check_answers(
    make_pool: Any, monkeypatch: pytest.MonkeyPatch, schema: Any, items: list[Any]
) -> None:
    # No inline trial at all: every check goes to a worker.
    monkeypatch.setattr(schemas, "INLINE_MAX_VALUES", 0)
    pool = make_pool()
    problems = await pool.check_submission("t", schema, None, items)
    assert problems == SubmissionProblems(items=schemas.validate_input(schema, items))
    assert pool.started == 1


async def test_a_schema_too_large_to_check_is_refused_as_before(make_pool: Any) -> None:
    pool = make_pool()
    wide = {"type": [{"x": i} for i in range(3000)]}
    problems = await pool.check_submission("t", wide, None, [])
    assert problems.schema == "inputSchema is too large to check (more than 100000 checks)"
    assert problems.schema == schemas.check_schema(wide, "inputSchema")
    assert pool.started == 1  # too large for an inline trial


async def test_a_check_past_the_cpu_limit_is_refused_and_its_worker_replaced(
    make_pool: Any,
) -> None:
    registry = CollectorRegistry()
    pool = make_pool(cpu_s=1, metrics=BrokerMetrics(registry))
    assert await pool.check_result("t", *CPU_BURNER) == CPU_REFUSAL
    assert pool.started == 1
    assert pool.alive == 0  # killed by its CPU limit, not kept
    assert await pool.check_result("t", *ORDINARY) == ORDINARY_PROBLEM
    assert pool.started == 2  # a fresh worker, which serves on
    assert pool.alive == 1
    text = exposition(registry).decode()
    assert 'sandbox_broker_schema_worker_checks_total{limit="cpu"} 1.0' in text
    assert 'sandbox_broker_schema_worker_checks_total{limit=""} 1.0' in text


async def test_a_check_past_the_memory_limit_is_refused_and_its_worker_replaced(
    make_pool: Any,
) -> None:
    pool = make_pool(memory_bytes=128 * MIB)
    # 3 million empty lists: 9 MB of JSON, ~200 MB once decoded in the worker.
    problem = await pool.check_result("t", '{"type": "array"}', [[]] * 3_000_000)
    assert problem == (
        "result: validating against the schema needed more than the 128 MiB of memory the "
        "broker allows a schema check; simplify the schema or send less data"
    )
    assert pool.alive == 0  # a worker that neared its limit retires
    assert await pool.check_result("t", *ORDINARY) == ORDINARY_PROBLEM
    assert pool.started == 2


async def test_one_tenants_hostile_checks_never_hold_another_tenants(make_pool: Any) -> None:
    pool = make_pool(cpu_s=1, workers=2)
    assert pool.per_tenant == 1
    hostile = [asyncio.create_task(pool.check_result("mallory", *CPU_BURNER)) for _ in range(2)]
    await asyncio.sleep(0)  # mallory's checks are under way (the first holds a worker)
    ordinary = asyncio.create_task(pool.check_result("alice", *ORDINARY))
    done, _ = await asyncio.wait([*hostile, ordinary], return_when=asyncio.FIRST_COMPLETED)
    # Alice's check took the worker mallory could not hold; mallory's second check
    # waits for its first.
    assert done == {ordinary}
    assert ordinary.result() == ORDINARY_PROBLEM
    assert await asyncio.gather(*hostile) == [CPU_REFUSAL, CPU_REFUSAL]


async def test_a_cancelled_check_kills_its_worker_and_the_pool_goes_on(make_pool: Any) -> None:
    pool = make_pool(cpu_s=30)
    check = asyncio.create_task(pool.check_result("t", *CPU_BURNER))
    while pool.started == 0:  # noqa: ASYNC110 - the pool has no event for it; a few turns
        await asyncio.sleep(0.01)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    assert pool.alive == 0
    assert await pool.check_result("t", *ORDINARY) == ORDINARY_PROBLEM
