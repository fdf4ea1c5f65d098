"""One task through the whole pipeline: analyze, run in a sandbox, shape, audit.

Owns: the order of the stages, n8n's ``continueOnFail`` substitution, the
document that ``sandbox-runner exec`` prints (and the HTTP API returns), and the
audit record of every task (:class:`AuditRecord`, one type however the task ended:
the pipeline makes it, the runner service adds what it knows and writes it), and
the one check of the per-task limits a task may ask for against a ceiling
(:func:`check_requested_limits`: the runner service's and the broker API's). It
knows nothing of Docker or of the wire: it is handed a
:class:`~runner.sandbox.base.Sandbox` and an analyzer.

A tenant's code is hostile input to the runner itself, before any container
exists: it is measured first (larger than ``limits.code_bytes``: ``code_too_large``,
never parsed), then analyzed off the event loop by an
:class:`~runner.analyzer.pool.AnalysisPool` (all but tiny code in worker processes
with their own CPU and memory limits: ``analysis_limit_exceeded`` when one bites),
so that one tenant's input cannot stall every other tenant's task.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from runner.analyzer import SECURITY_VIOLATIONS_MESSAGE, Analyzer
from runner.analyzer.pool import AnalysisPool
from runner.errors import ConfigurationError, LimitAboveCeiling
from runner.logs import task_context
from runner.sandbox.base import (
    JSON,
    ExecutionResult,
    GuardConfig,
    Limits,
    Mode,
    Outcome,
    Sandbox,
    Stage,
    TaskError,
    TaskSpec,
)


def new_task_id() -> str:
    return uuid.uuid4().hex


def code_size(code: str) -> int:
    """UTF-8 bytes of ``code`` (a lone surrogate counts as the 3 bytes it takes).

    One C-speed encode: ~5 ms for 8 MB, and code that large is refused right after.
    """
    return len(code.encode("utf-8", "surrogatepass"))


def code_too_large_message(size: int, limit: int) -> str:
    """The error text of ``code_too_large`` (the HTTP API may reuse it)."""
    return f"Task code is {size:,} bytes, above the limit of {limit:,} bytes (limits.code_bytes)"


def per_task(
    timeout_s: float | None, memory_mb: float | None, cpus: float | None
) -> dict[str, float | None]:
    """The three limits a task may ask for, by their names on the wire (the ``limits``
    of ``broker:tasksettings``) and in the HTTP API, in the order they are checked."""
    return {"timeoutSeconds": timeout_s, "memoryMb": memory_mb, "cpus": cpus}


def check_requested_limits(
    requested: Mapping[str, float | None],
    ceilings: Mapping[str, float | None],
    refusal: Callable[[str, float, float], str],
    *,
    floors: Mapping[str, float | None] | None = None,
) -> None:
    """Refuse per-task limits asked for above their ceilings, or below their floors.

    The one check of both places a task asks for limits: the runner service (what its
    broker sends with a task, against the runner's own limits) and the broker's HTTP
    API (what a caller submits, against the runner's limits it was started with).
    Limit by limit (:func:`per_task` order), the ceiling first; a value or a ceiling of
    None is not checked. Raises :class:`~runner.errors.LimitAboveCeiling` with
    ``refusal(name, value, ceiling)``, the caller's own words (the runner names its
    setting, the broker where its ceiling came from), or with the floor's message.
    """
    for name, value in requested.items():
        if value is None:
            continue
        ceiling = ceilings.get(name)
        if ceiling is not None and value > ceiling:
            raise LimitAboveCeiling(refusal(name, value, ceiling))
        minimum = None if floors is None else floors.get(name)
        if minimum is not None and not value >= minimum:
            # A request that rounds to nothing (cpus 1e-10 -> NanoCpus 0) would be no
            # limit at all: refused like one above the ceiling (the same error path).
            raise LimitAboveCeiling(f"{name} {value:g} is below the minimum of {minimum:g}")


class ServiceOutcome(StrEnum):
    """The ``outcome`` of a task that no sandbox report came back for, in the runner
    service's audit record and metrics (beside the :class:`Outcome` values)."""

    REJECTED = "rejected"  # refused before it ran: a limit asked for above the runner's
    RUNNER_ERROR = "runner_error"  # a fault of the runner or of what it depends on
    INTERNAL_ERROR = "internal_error"  # a bug of ours


@dataclass(frozen=True, slots=True)
class ImageVariantSandbox:
    """An ``[image.variants]`` image this runner made ready for the tenants that name
    it: the sandbox that makes its containers (the default one's engine, isolation and
    self-check, another image), and the image, for the audit record."""

    name: str
    sandbox: Sandbox
    image: str
    image_id: str | None
    # The record's ``isolation`` for its tasks: its own self-check's report.
    isolation: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskProfile:
    """Whose task it is, and what its tenant's profile makes of the pipeline's defaults.

    Made by the caller's resolver (:mod:`runner.cli.wiring`, from the runner's own policy
    bundle: never from what a broker sends); the pipeline only applies it. ``limits`` is
    what the tenant's tasks get and the most any of them may ask for; ``sets`` names the
    per-task limits (wire names) its profile sets, ``source`` where (for refusals);
    ``refusal``, when set, is why this runner cannot run the tenant's tasks at all (its
    profile asks for a runtime tier or an image this runner does not have); ``variant``,
    when set, the image variant its tasks run on instead of the pipeline's image.
    """

    tenant: str
    limits: Limits
    analyzer: Analyzer
    guards: GuardConfig
    audit: Mapping[str, str | None]  # the record's ``tenant``: name, profile, profileSha256
    sets: frozenset[str] = frozenset()
    source: str | None = None
    refusal: str | None = None
    variant: ImageVariantSandbox | None = None


@dataclass(frozen=True, slots=True)
class TaskRequest:
    code: str
    items: list[JSON] = field(default_factory=list)
    mode: Mode = Mode.ALL_ITEMS
    continue_on_fail: bool = False
    query: JSON = None
    task_id: str = field(default_factory=new_task_id)
    limits: Limits | None = None  # None: the pipeline's defaults (or the profile's)
    profile: TaskProfile | None = None  # None: no tenant named (n8n, exec): the defaults


#: The ``event`` of the audit line the runner service writes for every finished task.
AUDIT_EVENT = "task_completed"


@dataclass(frozen=True, slots=True)
class PipelineFacts:
    """What the pipeline records of a task it took (to a sandbox, or refused before)."""

    started_at: datetime  # wall clock: records are read by people and log stores
    mode: Mode
    continue_on_fail_applied: bool
    image: str
    image_id: str | None
    limits: Limits
    policy_sha256: str | None
    isolation: dict[str, Any]
    details: dict[str, JSON]
    tenant: Mapping[str, str | None] | None = None  # TaskProfile.audit, when a tenant was named
    image_variant: str | None = None  # the [image.variants] name, when the task ran on one


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    """What the runner service adds to the record of a task it was handed."""

    # The id the broker knows this process by (new on every start); the record's
    # ``runnerId`` is the stable owner of our containers (SANDBOX_RUNNER_ID).
    broker_runner_id: str
    workflow_id: str
    workflow_name: str
    node_id: str
    node_name: str
    queue_ms: float | None = None  # accepted -> the pipeline started (when it did)
    # The tenant the broker named, on the short record of a task the pipeline never took.
    tenant: Mapping[str, str | None] | None = None

    def workflow_json(self) -> dict[str, str]:
        return {
            "workflowId": self.workflow_id,
            "workflowName": self.workflow_name,
            "nodeId": self.node_id,
            "nodeName": self.node_name,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """The audit record of one finished task: one type, however the task ended.

    ``pipeline``: set when the pipeline took the task (the record of its report: the
    ``audit`` of ``exec``'s document and of the report a runner sends its broker); None
    when the runner service ended it first (a limit refused, a fault, a bug of ours).
    ``service``: set on the line the service writes to the ``runner.audit`` logger.
    ``durations_ms`` in milliseconds, as measured (:meth:`as_json` rounds them).
    A task of a named tenant adds ``tenant`` (name, profile file and its sha256) after
    ``policySha256`` (after ``containerId`` in the short shape); without one the record
    is what it always was.
    """

    task_id: str
    runner_id: str
    outcome: Outcome | ServiceOutcome
    error_code: str | None  # an ErrorCode (a fault class's code is one)
    stage: str | None  # a Stage (a fault's is one)
    container_id: str | None
    durations_ms: dict[str, float]
    pipeline: PipelineFacts | None = None
    service: ServiceFacts | None = None

    def with_service(self, service: ServiceFacts) -> AuditRecord:
        return replace(self, service=service)

    def as_json(self) -> dict[str, Any]:
        """The record as JSON values. Its keys and their order are a contract (log
        stores, ``exec``'s document, the broker's result document): one shape when the
        pipeline took the task, a short one when it did not."""
        service = self.service
        record: dict[str, Any] = {"event": AUDIT_EVENT} if service is not None else {}
        record |= {"taskId": self.task_id, "runnerId": self.runner_id}
        durations = {name: round(value, 3) for name, value in self.durations_ms.items()}
        error_code = None if self.error_code is None else str(self.error_code)
        stage = None if self.stage is None else str(self.stage)
        facts = self.pipeline
        if facts is None:
            if service is not None:
                record["brokerRunnerId"] = service.broker_runner_id
            record |= {
                "outcome": self.outcome.value,
                "errorCode": error_code,
                "stage": stage,
                "containerId": self.container_id,
            }
            if service is not None and service.tenant is not None:
                record["tenant"] = dict(service.tenant)
            record["durationsMs"] = durations
            return record if service is None else record | service.workflow_json()
        record |= {
            "startedAt": facts.started_at.isoformat(timespec="milliseconds"),
            "mode": facts.mode.value,
            "outcome": self.outcome.value,
            "errorCode": error_code,
            "stage": stage,
            "continueOnFailApplied": facts.continue_on_fail_applied,
            "containerId": self.container_id,
            "image": facts.image,
            "imageId": facts.image_id,
        }
        if facts.image_variant is not None:
            record["imageVariant"] = facts.image_variant
        record |= {
            "limits": facts.limits.as_audit(),
            "policySha256": facts.policy_sha256,
        }
        if facts.tenant is not None:
            record["tenant"] = dict(facts.tenant)
        record |= {
            "isolation": facts.isolation,
            "durationsMs": durations,
            "details": facts.details,
        }
        if service is None:
            return record
        queue_ms = None if service.queue_ms is None else round(service.queue_ms, 3)
        record["brokerRunnerId"] = service.broker_runner_id
        return record | service.workflow_json() | {"queueMs": queue_ms}

    def log_line(self) -> str:
        """The record as the ``runner.audit`` logger's line: one JSON object."""
        return json.dumps(self.as_json(), ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class TaskReport:
    """How one task ended, with its audit record."""

    task_id: str
    outcome: Outcome
    result: JSON
    error: TaskError | None
    prints: list[list[str]]
    record: AuditRecord

    @property
    def audit(self) -> dict[str, Any]:
        """The audit record as JSON values (what ``exec`` prints, what a broker gets)."""
        return self.record.as_json()

    @property
    def is_success(self) -> bool:
        return self.error is None

    def document(self) -> dict[str, Any]:
        """The JSON document of ``exec`` (one per task)."""
        if self.error is None:
            return {
                "status": "success",
                "result": self.result,
                "prints": self.prints,
                "audit": self.audit,
            }
        return {
            "status": "error",
            "error": {
                "message": self.error.message,
                "description": self.error.description,
                "code": self.error.code.value,
                "stage": self.error.stage.value,
            },
            "prints": self.prints,
            "audit": self.audit,
        }


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Facts that are the same for every task of one pipeline."""

    runner_id: str
    image: str
    image_id: str | None
    isolation: dict[str, Any]
    # The policy bundle every task of this pipeline runs under (runner.policy).
    policy_sha256: str | None = None


class TaskPipeline:
    def __init__(
        self,
        *,
        sandbox: Sandbox,
        analyzer: Analyzer,
        guards: GuardConfig,
        limits: Limits,
        context: AuditContext,
        analysis: AnalysisPool | None = None,
        profiles: Callable[[str], TaskProfile] | None = None,
        variants: Sequence[ImageVariantSandbox] = (),
    ) -> None:
        """``profiles``: a tenant's name -> its :class:`TaskProfile` (the runner's own
        policy bundle resolves it); without it, every task gets the defaults.
        ``variants``: the image variants the profiles run tasks on (their owner closes
        them; the pipeline cancels on them too)."""
        self.sandbox = sandbox
        self.variants = tuple(variants)
        self.analyzer = analyzer
        self.guards = guards
        self.limits = limits
        self.context = context
        self._profiles = profiles
        # Workers sized for the largest code this pipeline accepts; started on first use.
        self.analysis = analysis or AnalysisPool(code_bytes=limits.code_bytes)

    def profile_for(self, tenant: str | None) -> TaskProfile | None:
        """The profile a task of ``tenant`` runs under (None: no tenant, the defaults)."""
        if tenant is None:
            return None
        if self._profiles is None:
            return TaskProfile(
                tenant,
                self.limits,
                self.analyzer,
                self.guards,
                {"name": tenant, "profile": None, "profileSha256": None},
            )
        return self._profiles(tenant)

    async def cancel(self, task_id: str) -> None:
        """Cancel ``task_id`` on whichever sandbox runs it (a no-op on the others)."""
        for sandbox in (self.sandbox, *(variant.sandbox for variant in self.variants)):
            await sandbox.cancel(task_id)

    async def aclose(self) -> None:
        """Stop the analysis workers (they are daemonic: a process exit stops them too)."""
        await self.analysis.aclose()

    async def run(self, request: TaskRequest) -> TaskReport:
        # Every log line of this task (worker threads included) carries its id.
        with task_context(request.task_id):
            return await self._run(request)

    async def _run(self, request: TaskRequest) -> TaskReport:
        started_wall = datetime.now(UTC)
        begin = time.monotonic()
        profile = request.profile
        limits = request.limits or (profile.limits if profile else self.limits)
        analyzer = profile.analyzer if profile else self.analyzer
        guards = profile.guards if profile else self.guards
        below = limits.below_minimum()
        if below:
            # Every entry point refuses these; reaching here is a bug of ours, and a
            # limit that rounds to nothing must never reach a container (NanoCpus 0
            # is no CPU limit at all).
            raise ConfigurationError(f"Limits below their minimum: {', '.join(below)}")
        size = code_size(request.code)
        if size > limits.code_bytes:
            # Before any parsing: parsing is what costs the runner ~500 bytes of memory
            # and ~3 us of CPU per byte.
            verdict = None
            execution = _analyzer_failure(
                Outcome.CODE_TOO_LARGE, code_too_large_message(size, limits.code_bytes), ""
            )
        else:
            verdict = await self.analysis.check(analyzer, request.code)
        analyze_ms = (time.monotonic() - begin) * 1000
        if verdict is None:
            pass  # refused before analysis
        elif verdict.limit_exceeded is not None:
            execution = _analyzer_failure(Outcome.ANALYSIS_LIMIT, verdict.limit_exceeded, "")
        elif verdict.syntax_error is not None:
            execution = _analyzer_failure(
                Outcome.SYNTAX_ERROR, verdict.syntax_error, "", has_description=False
            )
        elif not verdict.is_allowed:
            execution = _analyzer_failure(
                Outcome.SECURITY_VIOLATION, SECURITY_VIOLATIONS_MESSAGE, verdict.description
            )
        else:
            spec = TaskSpec(
                task_id=request.task_id,
                code=request.code,
                mode=request.mode,
                items=request.items,
                guards=guards,
                query=request.query,
            )
            variant = profile.variant if profile else None
            sandbox = variant.sandbox if variant else self.sandbox
            execution = await sandbox.run(spec, limits)
        total_ms = (time.monotonic() - begin) * 1000
        error, result = execution.error, execution.result
        substituted = False
        if error is not None and request.continue_on_fail and error.stage is not Stage.ANALYZE:
            # n8n: a failure while running becomes one error item; analyzer rejections stay.
            result, error, substituted = [{"json": {"error": error.message}}], None, True
        record = self._audit(
            request, execution, limits, started_wall, analyze_ms, total_ms, substituted
        )
        return TaskReport(
            task_id=request.task_id,
            outcome=execution.outcome,
            result=result,
            error=error,
            prints=execution.prints,
            record=record,
        )

    def _audit(
        self,
        request: TaskRequest,
        execution: ExecutionResult,
        limits: Limits,
        started_wall: datetime,
        analyze_ms: float,
        total_ms: float,
        substituted: bool,
    ) -> AuditRecord:
        phases = execution.durations_ms
        durations = {"analyze": analyze_ms, **phases, "total": total_ms}
        setup_phases = ("poolWait", "create", "attach", "start")
        if any(name in phases for name in setup_phases):
            # Warm: only the wait for a pool slot (its set-up happened before the task).
            durations["containerSetup"] = sum(phases.get(name, 0.0) for name in setup_phases)
        error = execution.error
        variant = request.profile.variant if request.profile else None
        return AuditRecord(
            task_id=request.task_id,
            runner_id=self.context.runner_id,
            outcome=execution.outcome,
            error_code=error.code.error_code if error else None,
            stage=error.stage if error else None,
            container_id=execution.container_id,
            durations_ms=durations,
            pipeline=PipelineFacts(
                started_at=started_wall,
                mode=request.mode,
                continue_on_fail_applied=substituted,
                image=variant.image if variant else self.context.image,
                image_id=variant.image_id if variant else self.context.image_id,
                limits=limits,
                policy_sha256=self.context.policy_sha256,
                isolation=variant.isolation if variant else self.context.isolation,
                details=execution.details,
                tenant=request.profile.audit if request.profile else None,
                image_variant=variant.name if variant else None,
            ),
        )


def _analyzer_failure(
    code: Outcome, message: str, description: str, *, has_description: bool = True
) -> ExecutionResult:
    return ExecutionResult(
        outcome=code,
        error=TaskError(code, message, description, Stage.ANALYZE, has_description),
    )
