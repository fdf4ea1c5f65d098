"""Analysis off the event loop: a small pool of worker processes with their own limits.

Owns: :class:`AnalysisPool` -- which code is analyzed inline and which in a worker,
its two lanes and the limits their workers run under, and the verdict a task gets
when its analysis hit one of them. The workers themselves (started lazily, replaced
when one dies, retires or is killed; the pipes; the limits set) are
:class:`runner.workers.pool.WorkerPool`'s, shared with the broker's schema checks.

Why processes: ``ast.parse`` holds the interpreter for its whole run (a thread does
not help: the GIL), and costs ~3 us of CPU and ~500 bytes of memory per byte of
code. Inline, one tenant's 8 MB of code stalled every other tenant's task for 35 s
and would take ~4 GB of the runner's memory. In a worker it costs that worker
only, within ``RLIMIT_AS`` and a CPU-time budget, and the event loop keeps serving.
Tiny code (:data:`INLINE_MAX_CHARS`) is still analyzed inline: a round trip to a
worker costs more than parsing it, and its worst case is a few milliseconds.

The verdict cache stays in the runner (:class:`~runner.analyzer.cache.Analyzer`): a
repeated code costs a hash, not a worker. Verdicts of the CPU and memory limits are
cached like any other (the same code hits them again); a worker that crashed or was
killed for wall time is not held against the code.

A worker that dies, exceeds a limit or is cancelled mid-job is discarded (its task
gets a verdict with ``limit_exceeded``) and the next job starts a fresh one; no
other task is affected. Waiting for an answer uses the event loop's reader on the
pipe, never a thread blocked for the whole analysis.

Must not import: pydantic, docker, the sandbox (of the runner: the analyzer and
:mod:`runner.workers`).
"""

from __future__ import annotations

import json

from runner.analyzer.cache import Analyzer, Verdict
from runner.analyzer.core import ImportPolicy, Violation
from runner.workers.pool import LaneSpec, Limit, LimitHit, WorkerPool

#: Code up to this many characters is analyzed inline. Measured on the reference host
#: (docs/reliability.md, "Analysis off the event loop"): a small task (~100 bytes)
#: takes 0.12 ms inline and 0.24 ms through a worker (p95 0.36 ms); parsing costs
#: ~2.7 us per byte at worst (many short statements or calls), so 1 KiB holds the
#: event loop for ~3 ms at most, and larger code is cheaper in a worker.
INLINE_MAX_CHARS = 1024
#: Code up to this many characters goes to the small lane (at most ~0.2 s to parse):
#: it never waits behind large code, which has a lane of its own.
SMALL_LANE_MAX_CHARS = 64 * 1024
#: Workers per lane: one per core of the reference host (2); more would only share
#: the cores.
DEFAULT_WORKERS = 2
#: CPU seconds one analysis may take: twice the slowest parse measured per byte of
#: the largest code the lane accepts (1 MiB of short tuples or f-strings: 5.3 s), and
#: never less than MIN_CPU_S. A hostile input is stopped long before it matters.
CPU_S_PER_CODE_BYTE = 10e-6
MIN_CPU_S = 5.0
#: Memory of a worker: its own start-up footprint plus this much per byte of the
#: largest code it must accept (measured: up to ~500 bytes per byte; twice that, since
#: RLIMIT_AS counts address space, not resident pages).
WORKER_BASE_BYTES = 96 * 1024 * 1024
WORKER_BYTES_PER_CODE_BYTE = 1024

LIMIT_MESSAGES = {
    Limit.MEMORY: "it needed more than the analyzer's memory limit of {memory_mib} MiB",
    Limit.CPU: "it needed more than the analyzer's CPU-time limit of {cpu_s:g} s",
    Limit.WALL: "the analyzer did not answer within {wall_s:g} s",
    Limit.CRASHED: "the analyzer's worker process died ({how})",
}


def worker_memory_bytes(code_bytes: int) -> int:
    """``RLIMIT_AS`` of a worker that must analyze code of up to ``code_bytes``."""
    return WORKER_BASE_BYTES + code_bytes * WORKER_BYTES_PER_CODE_BYTE


def worker_cpu_s(code_bytes: int) -> float:
    """CPU seconds of one analysis of code of up to ``code_bytes``."""
    return max(MIN_CPU_S, code_bytes * CPU_S_PER_CODE_BYTE)


class AnalysisPool:
    """Analyzes task code in worker processes (all but tiny code), caching verdicts.

    Two lanes of workers, each with its own slots: code up to
    :data:`SMALL_LANE_MAX_CHARS` (milliseconds to parse) and larger code (up to
    seconds). Hostile large code can fill its own lane only: a tenant's ordinary
    task never queues behind another tenant's megabyte.

    One pool per pipeline. Workers are started when first needed; :meth:`aclose`
    stops them, and so does the pool's finalizer (garbage collection, interpreter
    exit), so a pipeline nobody closes leaves no process behind. A worker whose
    runner died reads EOF on its stdin and exits. A pool may be used from one event
    loop at a time; a new loop (a test, a second ``asyncio.run``) gets fresh workers.
    """

    def __init__(
        self,
        *,
        code_bytes: int,
        workers: int = DEFAULT_WORKERS,
        cpu_s: float | None = None,
        memory_bytes: int | None = None,
        inline_max_chars: int = INLINE_MAX_CHARS,
    ) -> None:
        """``cpu_s`` and ``memory_bytes`` override every worker's CPU budget and
        ``RLIMIT_AS`` (default: :func:`worker_cpu_s`, :func:`worker_memory_bytes`)."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.inline_max_chars = inline_max_chars
        self._max_chars = (min(SMALL_LANE_MAX_CHARS, code_bytes), code_bytes)
        self._workers = WorkerPool(
            "runner.analyzer.worker",
            [
                LaneSpec(
                    workers,
                    worker_memory_bytes(max_chars) if memory_bytes is None else memory_bytes,
                    worker_cpu_s(max_chars) if cpu_s is None else cpu_s,
                )
                for max_chars in self._max_chars
            ],
        )

    @property
    def started(self) -> int:
        """Workers started over the pool's life (tests, metrics)."""
        return self._workers.started

    @property
    def memory_bytes(self) -> int:
        """``RLIMIT_AS`` of a worker of the large lane (the most any worker gets)."""
        return self._workers.lane(1).memory_bytes

    @property
    def cpu_s(self) -> float:
        """CPU budget of an analysis in the large lane (the most any analysis gets)."""
        return self._workers.lane(1).cpu_s

    async def check(self, analyzer: Analyzer, code: str) -> Verdict:
        """The verdict on ``code`` under ``analyzer``'s policy, never holding the loop long."""
        if len(code) <= self.inline_max_chars:
            return analyzer.check(code)  # tiny: about as cheap as a round trip, bounded
        cached = analyzer.lookup(code)
        if cached is not None:
            return cached
        verdict, cacheable = await self._in_worker(code, analyzer.policy)
        if cacheable:
            analyzer.store(code, verdict)
        return verdict

    async def aclose(self) -> None:
        """Stop every worker."""
        await self._workers.aclose()

    async def _in_worker(self, code: str, policy: ImportPolicy) -> tuple[Verdict, bool]:
        """(verdict, cacheable)."""
        lane = 0 if len(code) <= self._max_chars[0] else 1
        job = json.dumps(
            {
                "code": code,
                "stdlib": sorted(policy.stdlib_allow),
                "external": sorted(policy.external_allow),
            },
            ensure_ascii=True,  # a lone surrogate travels as an escape
        ).encode("ascii")
        reply = await self._workers.run(lane, job)
        if isinstance(reply, LimitHit):
            # CPU and memory: the code's own cost (it hits them again); a worker that
            # crashed or was killed for wall time is not held against the code.
            return self._limit(reply, self._workers.lane(lane)), reply.is_the_inputs
        if "syntaxError" in reply:
            return Verdict(syntax_error=str(reply["syntaxError"])), True
        violations = tuple(Violation(int(line), str(text)) for line, text in reply["violations"])
        return Verdict(violations=violations), True

    @staticmethod
    def _limit(hit: LimitHit, lane: LaneSpec) -> Verdict:
        reason = LIMIT_MESSAGES[hit.kind].format(
            memory_mib=lane.memory_bytes // (1024 * 1024),
            cpu_s=lane.cpu_s,
            wall_s=lane.wall_s,
            how=hit.how,
        )
        return Verdict(limit_exceeded=f"Task code could not be analyzed: {reason}")
