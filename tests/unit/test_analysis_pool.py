"""Analysis off the event loop (runner/analyzer/pool.py) and the code size ceiling.

A tenant's code is the runner's own hostile input: it is measured before anything
parses it (``code_too_large``), and parsed in worker processes with their own CPU
and memory limits (``analysis_limit_exceeded``), so that one tenant's megabyte never
stalls another tenant's task. Real worker processes, no Docker.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from runner.analyzer import Analyzer, ImportPolicy, Verdict
from runner.analyzer.pool import INLINE_MAX_CHARS, SMALL_LANE_MAX_CHARS, AnalysisPool
from runner.errors import ConfigurationError
from runner.pipeline import AuditContext, TaskPipeline, TaskRequest
from runner.sandbox.base import (
    MIB,
    ExecutionResult,
    GuardConfig,
    Limits,
    Outcome,
    Stage,
    TaskSpec,
)

pytestmark = pytest.mark.timeout(120)

POLICY = ImportPolicy(frozenset({"json", "math", "re"}), frozenset())
# Above the inline bound, with a violation and a syntax-valid body.
MEDIUM = "import os\nx = ().__class__\n" + "y = [1, 2, 3]\n" * 400
# Parses for seconds and takes hundreds of MiB (about 3 us and 450 bytes per byte).
EXPENSIVE_1MIB = "x = 1\n" * (1024 * 1024 // 6)


@pytest.fixture
async def pool() -> AsyncIterator[AnalysisPool]:
    analysis = AnalysisPool(code_bytes=1024 * 1024)
    yield analysis
    await analysis.aclose()


def test_the_inline_bound_is_small_and_the_medium_probe_is_above_it() -> None:
    assert INLINE_MAX_CHARS <= 4096
    assert INLINE_MAX_CHARS < len(MEDIUM) < SMALL_LANE_MAX_CHARS


async def test_tiny_code_is_analyzed_inline(pool: AnalysisPool) -> None:
    verdict = await pool.check(Analyzer(POLICY), "import os\nreturn 1")
    assert not verdict.is_allowed
    assert pool.started == 0


async def test_a_worker_gives_the_same_verdict_as_inline(pool: AnalysisPool) -> None:
    for code in (
        MEDIUM,
        MEDIUM + "return [\n",  # syntax error, n8n's text
        MEDIUM + "s = '\ud800'\n",  # a lone surrogate travels as an escape
        "x = 1\n" * 400,  # allowed
    ):
        assert await pool.check(Analyzer(POLICY), code) == Analyzer(POLICY).check(code)
    assert pool.started >= 1


async def test_the_verdict_cache_stays_in_the_runner(pool: AnalysisPool) -> None:
    analyzer = Analyzer(POLICY)
    first = await pool.check(analyzer, MEDIUM)
    started = pool.started
    for _ in range(5):
        assert await pool.check(analyzer, MEDIUM) == first
    info = analyzer.cache_info()
    assert (info.hits, info.misses) == (5, 1)
    assert pool.started == started  # repeated code costs a hash, not a worker


async def test_the_memory_limit_refuses_one_task_and_the_worker_is_replaced() -> None:
    analysis = AnalysisPool(code_bytes=1024 * 1024, memory_bytes=160 * MIB)
    try:
        analyzer = Analyzer(POLICY)
        verdict = await analysis.check(analyzer, EXPENSIVE_1MIB)
        assert verdict.limit_exceeded is not None
        assert "memory limit of 160 MiB" in verdict.limit_exceeded
        assert not verdict.is_allowed
        # The next task is analyzed normally, by a fresh worker.
        assert await analysis.check(analyzer, MEDIUM) == Analyzer(POLICY).check(MEDIUM)
        assert analysis.started == 2
    finally:
        await analysis.aclose()


async def test_the_cpu_limit_refuses_one_task_and_the_worker_is_replaced() -> None:
    analysis = AnalysisPool(code_bytes=1024 * 1024, cpu_s=1.0)
    try:
        analyzer = Analyzer(POLICY)
        verdict = await analysis.check(analyzer, EXPENSIVE_1MIB + "x = 1\n" * 100_000)
        assert verdict.limit_exceeded is not None
        assert "CPU-time limit of 1 s" in verdict.limit_exceeded
        assert await analysis.check(analyzer, MEDIUM) == Analyzer(POLICY).check(MEDIUM)
    finally:
        await analysis.aclose()


async def test_a_cancelled_analysis_kills_its_worker_and_the_pool_goes_on(
    pool: AnalysisPool,
) -> None:
    job = asyncio.create_task(pool.check(Analyzer(POLICY), EXPENSIVE_1MIB))
    while pool.started == 0:  # noqa: ASYNC110 - the pool has no event for it; a few turns
        await asyncio.sleep(0)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await pool.check(Analyzer(POLICY), MEDIUM) == Analyzer(POLICY).check(MEDIUM)


async def test_a_new_event_loop_gets_fresh_workers() -> None:
    analysis = AnalysisPool(code_bytes=1024 * 1024)

    async def once() -> Verdict:
        return await analysis.check(Analyzer(POLICY), MEDIUM)

    try:
        first = await once()
        second = await asyncio.to_thread(asyncio.run, once())  # another loop
        assert first == second
        assert analysis.started == 2
    finally:
        await analysis.aclose()


# -- through the pipeline --------------------------------------------------------------


class InstantSandbox:
    """Succeeds at once, after a few turns of the event loop (as a real sandbox would)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        for _ in range(3):
            await asyncio.sleep(0)
        self.ran.append(spec.task_id)
        return ExecutionResult(Outcome.SUCCESS, result=[])

    async def cancel(self, task_id: str) -> bool:
        return False  # every task ends at once

    async def aclose(self) -> None:
        return None


def pipeline(sandbox: InstantSandbox, limits: Limits | None = None) -> TaskPipeline:
    return TaskPipeline(
        sandbox=sandbox,
        analyzer=Analyzer(POLICY),
        guards=GuardConfig(stdlib_allow=("json",), external_allow=(), builtins_deny=()),
        limits=limits or Limits(),
        context=AuditContext(runner_id="unit", image="local", image_id=None, isolation={}),
    )


async def test_8_mb_of_code_is_refused_before_anything_parses_it() -> None:
    sandbox = InstantSandbox()
    runner = pipeline(sandbox)
    code = "x = 1\n" * 1_400_000  # 8.4 MB: 35 s and ~4 GB to parse
    try:
        report = await runner.run(TaskRequest(code=code))
    finally:
        await runner.aclose()
    assert report.error is not None
    assert report.error.code is Outcome.CODE_TOO_LARGE
    assert report.error.stage is Stage.ANALYZE
    assert report.error.message == (
        "Task code is 8,400,000 bytes, above the limit of 262,144 bytes (limits.code_bytes)"
    )
    assert runner.analyzer.cache_info().misses == 0  # never analyzed
    assert runner.analysis.started == 0  # no worker either
    assert sandbox.ran == []  # and no container
    assert report.audit["limits"]["codeBytes"] == 262_144


async def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    limits = replace(Limits(), code_bytes=1024)
    runner = pipeline(InstantSandbox(), limits)
    try:
        fits = await runner.run(TaskRequest(code="#" + "a" * 1023))
        too_big = await runner.run(TaskRequest(code="#" + "é" * 512))  # 1025 bytes
    finally:
        await runner.aclose()
    assert fits.error is None
    assert too_big.error is not None
    assert too_big.error.code is Outcome.CODE_TOO_LARGE


async def test_an_analysis_limit_is_a_structured_task_error() -> None:
    sandbox = InstantSandbox()
    runner = TaskPipeline(
        sandbox=sandbox,
        analyzer=Analyzer(POLICY),
        guards=GuardConfig(stdlib_allow=("json",), external_allow=(), builtins_deny=()),
        limits=replace(Limits(), code_bytes=1024 * 1024),
        context=AuditContext(runner_id="unit", image="local", image_id=None, isolation={}),
        analysis=AnalysisPool(code_bytes=1024 * 1024, memory_bytes=160 * MIB),
    )
    try:
        report = await runner.run(TaskRequest(code=EXPENSIVE_1MIB))
    finally:
        await runner.aclose()
    assert report.error is not None
    assert report.error.code is Outcome.ANALYSIS_LIMIT
    assert report.error.stage is Stage.ANALYZE
    assert report.error.message.startswith("Task code could not be analyzed: it needed more")
    assert sandbox.ran == []


async def test_expensive_code_does_not_delay_another_callers_trivial_tasks() -> None:
    """b3a21b2 parsed this in a thread that held the GIL: every other task waited.

    1 MiB of code with a syntax error at its very end (half a second of parsing, and
    nothing after it: the parse is the whole cost) starts first; then 100 trivial
    tasks run one after another through the same pipeline. All of them must be done
    while the expensive one is still being analyzed: ordering, not timing.
    """
    sandbox = InstantSandbox()
    runner = pipeline(sandbox, replace(Limits(), code_bytes=1024 * 1024))
    expensive_code = EXPENSIVE_1MIB[: 1024 * 1024 - 16] + "return [\n"
    try:
        expensive = asyncio.create_task(runner.run(TaskRequest(code=expensive_code)))
        await asyncio.sleep(0)  # it has started (its analysis is under way)
        for n in range(100):
            report = await runner.run(TaskRequest(code=f"return [{{'json': {{'n': {n}}}}}]"))
            assert report.error is None
        assert not expensive.done()
        report = await expensive
        assert report.error is not None
        assert report.error.code is Outcome.SYNTAX_ERROR
        assert len(sandbox.ran) == 100
    finally:
        await runner.aclose()


async def test_limits_below_their_minimum_never_reach_a_sandbox() -> None:
    sandbox = InstantSandbox()
    runner = pipeline(sandbox)
    try:
        with pytest.raises(ConfigurationError, match=re.escape("cpus 1e-10 < 0.01")):
            await runner.run(TaskRequest(code="return 1", limits=replace(Limits(), cpus=1e-10)))
    finally:
        await runner.aclose()
    assert sandbox.ran == []
