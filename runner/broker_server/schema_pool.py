"""Callers' JSON Schemas checked off the event loop, in worker processes with limits.

Owns: :class:`SchemaPool` -- what of a submission's schema checks (``inputSchema`` and
``outputSchema`` against the meta-schema, the items against ``inputSchema``) and of a
result's (against ``outputSchema``) runs inline and what in a worker, the workers'
limits (a CPU-time limit per check, ``RLIMIT_AS`` per worker), how many of them one
tenant may hold at once, and the refusal a check gets when it hit a limit.

Why processes: jsonschema holds the interpreter for the whole of a check, and the
metering of :mod:`runner.broker_server.schemas` is a heuristic (a budget of keyword
checks, ~1 s at its base, seconds more for large payloads, and some checks cost far
more than others). In a worker a hostile schema costs that worker only, within its
limits; the broker's event loop keeps serving every other tenant. The metering stays:
it is the cheap, deterministic refusal, and the worker's limits are the wall behind it.

What runs where:

* inline, on the loop: a *trial* (``schemas.trial_*``) -- tiny schemas and data, under
  a budget of a few thousand checks (milliseconds). A trial that settles gives the
  answer the full check would give; one that does not (or a stack too deep to tell)
  defers to a worker, never refuses. Most submissions (small items, an ordinary
  schema) and results settle here, with no round trip;
* in a worker: the same check with its full budget. A check that exceeds the worker's
  CPU time or memory, or gets no answer, kills that worker (the next check gets a fresh
  one) and ends in a refusal of *that* task, worded as the metering's own refusal.

Fairness: one tenant holds at most ``workers - 1`` workers at once (at least one), so
another tenant's check always finds a worker that no single tenant's hostile schemas
can hold; a tenant's further checks wait for its own earlier ones.

Where it is called (the core stays sans-I/O and never waits): the API's submit route
checks a submission here *before* it reaches the core (a pure function of the
request); a result whose trial did not settle is parked by the core and checked here
by the driver (:mod:`runner.broker_server.driver`), which hands the verdict back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from runner.broker_server.schemas import Deferred, trial_input, trial_schema
from runner.metrics import BrokerMetrics
from runner.workers.pool import LaneSpec, Limit, LimitHit, WorkerPool

log = logging.getLogger(__name__)

#: Workers: one per core of the reference host (2); more would only share the cores.
DEFAULT_WORKERS = 2
#: CPU seconds of one check: at least MIN_CPU_S, and twice the slowest full-budget
#: check measured per byte of the largest payload (300,000 one-element rows, 2.4 MB:
#: 2.8 s, ~1.2 us per byte). Ordinary payloads take a fraction of a second.
MIN_CPU_S = 10.0
CPU_S_PER_PAYLOAD_BYTE = 2.4e-6
#: Memory of a worker (RLIMIT_AS, address space): the interpreter with jsonschema
#: maps ~25 MiB (21 MiB resident); the rest is room for a check's own work, plus up to
#: 32 bytes of Python objects per byte of JSON (a list of ``[]`` is ~21 times its JSON).
WORKER_BASE_BYTES = 256 * 1024 * 1024
WORKER_BYTES_PER_PAYLOAD_BYTE = 32

LIMIT_REASONS = {
    Limit.MEMORY: (
        "needed more than the {memory_mib} MiB of memory the broker allows a schema check"
    ),
    Limit.CPU: "needed more than the {cpu_s:g} s of CPU time the broker allows a schema check",
    Limit.WALL: "got no answer from the broker's schema worker within {wall_s:g} s",
    Limit.CRASHED: "stopped the broker's schema worker ({how})",
}
ADVICE = "simplify the schema or send less data"


def worker_cpu_s(max_payload_bytes: int) -> float:
    return max(MIN_CPU_S, max_payload_bytes * CPU_S_PER_PAYLOAD_BYTE)


def worker_memory_bytes(max_payload_bytes: int) -> int:
    return WORKER_BASE_BYTES + max_payload_bytes * WORKER_BYTES_PER_PAYLOAD_BYTE


@dataclass(frozen=True, slots=True)
class SubmissionProblems:
    """What is wrong with a submission's schemas (a 422 naming the schema) or with its
    items (a 422, ``Items do not match inputSchema: <items>``); both None: nothing."""

    schema: str | None = None
    items: str | None = None


class SchemaPool:
    """Applies callers' schemas: tiny checks inline, the rest in worker processes.

    ``max_payload_bytes``: the largest data a check gets (the API's request cap, a
    runner's output cap), which sizes the workers' limits; ``cpu_s`` and
    ``memory_bytes`` override them. Workers start when first needed; :meth:`aclose`
    stops them (the finalizer too: a pool nobody closes leaves no process behind).
    ``metrics``: where each check made in a worker is counted, by the limit it hit.
    """

    def __init__(
        self,
        *,
        max_payload_bytes: int,
        workers: int = DEFAULT_WORKERS,
        cpu_s: float | None = None,
        memory_bytes: int | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._spec = LaneSpec(
            workers,
            worker_memory_bytes(max_payload_bytes) if memory_bytes is None else memory_bytes,
            worker_cpu_s(max_payload_bytes) if cpu_s is None else cpu_s,
        )
        self._workers = WorkerPool("runner.broker_server.schema_worker", [self._spec])
        self.per_tenant = max(1, workers - 1)
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}  # tenant -> (gate, users)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics = metrics

    @property
    def started(self) -> int:
        """Workers started over the pool's life (tests)."""
        return self._workers.started

    @property
    def alive(self) -> int:
        """Worker processes the pool holds now."""
        return self._workers.alive

    def pids(self) -> list[int]:
        """Process ids of the workers (tests: none left behind)."""
        return self._workers.pids()

    @property
    def cpu_s(self) -> float:
        return self._spec.cpu_s

    @property
    def memory_bytes(self) -> int:
        return self._spec.memory_bytes

    async def aclose(self) -> None:
        """Stop every worker."""
        await self._workers.aclose()

    async def check_submission(
        self,
        tenant: str,
        input_schema: dict[str, Any] | None,
        output_schema: dict[str, Any] | None,
        items: list[Any],
    ) -> SubmissionProblems:
        """Both schemas against the meta-schema, then ``items`` (wrapped, ``{"json":
        ...}``) against ``input_schema``; the first problem, in that order."""
        for name, schema in (("inputSchema", input_schema), ("outputSchema", output_schema)):
            problem = trial_schema(schema, name)
            if isinstance(problem, Deferred):
                job: dict[str, Any] = {"kind": "schema", "name": name, "schema": schema}
                problem = await self._check(tenant, job, f"{name} is too large to check ({{}})")
            if problem is not None:
                return SubmissionProblems(schema=problem)
        problem = trial_input(input_schema, items)
        if isinstance(problem, Deferred):
            job = {"kind": "input", "schema": input_schema, "items": items}
            problem = await self._check(
                tenant, job, f"items: validating against the schema {{}}; {ADVICE}"
            )
        return SubmissionProblems(items=problem)

    async def check_result(self, tenant: str, schema_json: str, result: Any) -> str | None:
        """``result`` against the schema kept as JSON text, in a worker (the core has
        tried it inline already: :func:`runner.broker_server.schemas.trial_result`)."""

        def encode() -> bytes:
            # The schema's text is spliced in as kept: never decoded on the loop.
            data = json.dumps(result, ensure_ascii=True, allow_nan=True)
            return f'{{"kind":"result","schema":{schema_json},"result":{data}}}'.encode("ascii")

        return await self._check(
            tenant, encode, f"result: validating against the schema {{}}; {ADVICE}"
        )

    # -- one check in a worker ------------------------------------------------------------

    async def _check(self, tenant: str, job: Any, refusal: str) -> str | None:
        """The problem a worker finds; ``refusal`` (with the reason) when it hit a limit.

        ``job``: the job as data, or a function that encodes it (run in a thread: a
        large payload takes a while to encode)."""
        gate = self._enter(tenant)
        try:
            async with gate:
                try:
                    encode = job if callable(job) else lambda: _encode(job)
                    raw = await asyncio.to_thread(encode)
                except (ValueError, TypeError, RecursionError) as exc:
                    # JSON that came in as JSON always encodes; a bug here is no user's.
                    log.warning("a schema check could not be encoded: %s", exc)
                    return refusal.replace("{}", f"could not be encoded ({type(exc).__name__})")
                reply = await self._workers.run(0, raw)
        finally:
            self._leave(tenant)
        if self._metrics is not None:
            limit = reply.kind.value if isinstance(reply, LimitHit) else ""
            self._metrics.schema_worker_checks.labels(limit=limit).inc()
        if isinstance(reply, LimitHit):
            reason = LIMIT_REASONS[reply.kind].format(
                memory_mib=self._spec.memory_bytes // (1024 * 1024),
                cpu_s=self._spec.cpu_s,
                wall_s=self._spec.wall_s,
                how=reply.how,
            )
            log.warning("tenant %s: a schema check %s", tenant, reason)
            return refusal.replace("{}", reason)
        problem = reply.get("problem")
        return None if problem is None else str(problem)

    def _enter(self, tenant: str) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # semaphores belong to a loop (tests run several)
            self._loop, self._gates = loop, {}
        gate, users = self._gates.get(tenant) or (asyncio.Semaphore(self.per_tenant), 0)
        self._gates[tenant] = (gate, users + 1)
        return gate

    def _leave(self, tenant: str) -> None:
        gate, users = self._gates.get(tenant, (None, 0))
        if gate is None:
            return  # its loop's gates were dropped meanwhile
        if users <= 1:
            del self._gates[tenant]  # no tenant is kept once it has nothing to check
        else:
            self._gates[tenant] = (gate, users - 1)


def _encode(job: Any) -> bytes:
    # ensure_ascii: a lone surrogate travels as an escape; NaN stays NaN (the runner's
    # report may carry one; the worker reads what Python's JSON reads).
    return json.dumps(job, ensure_ascii=True, allow_nan=True).encode("ascii")
