"""Running the canaries through the pipeline tasks use, and the cached answer the
runner asks for before its first task."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from runner.analyzer import Analyzer
from runner.errors import IsolationNotEnforcedError
from runner.pipeline import AuditContext, TaskPipeline, TaskRequest
from runner.policy import EffectivePolicy
from runner.sandbox.base import MIB, HostLimitsView, Outcome, Sandbox, SandboxKernel
from runner.selfcheck.cache import CACHE_FORMAT, SelfCheckCache
from runner.selfcheck.canaries import (
    CANARY_GUARDS,
    CANARY_IMPORTS,
    FACTS_CANARY,
    MEMORY_CANARY,
    OVERSHOOT,
)
from runner.selfcheck.report import SelfCheckReport
from runner.selfcheck.verdicts import CanaryOutcome, evaluate

log = logging.getLogger(__name__)


# -- running the canaries --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelfCheckTarget:
    """Where the canaries run: the sandbox tasks will run in, and what is behind it."""

    sandbox: Sandbox
    policy: EffectivePolicy
    # The AppArmor profile the sandbox applies (None: the host has no AppArmor).
    apparmor_profile: str | None
    daemon: Mapping[str, str] = field(default_factory=dict)  # runner.sandbox.docker.describe_daemon
    image: str = ""
    image_id: str | None = None
    runner_id: str = "selfcheck"
    # Which kernel answers the canaries (the sandbox's, e.g. OciSandbox.kernel), and
    # what reads the limits applied to a canary's container on the host (None: none).
    kernel: SandboxKernel = SandboxKernel.LINUX
    host_view: HostLimitsView | None = None

    @property
    def cache_key(self) -> str:
        identity = {
            "format": CACHE_FORMAT,
            "daemon": dict(sorted(self.daemon.items())),
            "kernel": self.kernel.value,
            "policySha256": self.policy.sha256,
            "image": self.image_id or self.image,
            "apparmorProfile": self.apparmor_profile,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


async def run_selfcheck(target: SelfCheckTarget) -> SelfCheckReport:
    """Run both canaries now (no cache); infrastructure faults propagate."""
    policy = target.policy
    limits = policy.canary_limits()
    pipeline = TaskPipeline(
        sandbox=target.sandbox,
        analyzer=Analyzer(CANARY_IMPORTS),
        guards=CANARY_GUARDS,
        limits=limits,
        context=AuditContext(
            runner_id=target.runner_id,
            image=target.image,
            image_id=target.image_id,
            isolation={"selfcheck": "canary"},
            policy_sha256=policy.sha256,
        ),
    )
    checked_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    begin = time.monotonic()
    facts_request = TaskRequest(
        code=FACTS_CANARY, items=[{"json": {"threadCap": limits.pids * OVERSHOOT}}]
    )
    memory_cap_mb = limits.memory_bytes // MIB * OVERSHOOT
    memory_request = TaskRequest(code=MEMORY_CANARY, items=[{"json": {"capMb": memory_cap_mb}}])
    host_view = target.host_view
    if host_view is not None:
        host_view.observe_limits(facts_request.task_id)
    try:
        async with asyncio.TaskGroup() as group:
            facts_task = group.create_task(pipeline.run(facts_request))
            memory_task = group.create_task(pipeline.run(memory_request))
    except ExceptionGroup as failed:
        # A fault of the engine (it cannot start a canary) is one error, as it would be
        # for a task: the caller handles our error tree, not a group of them.
        raise failed.exceptions[0] from None
    finally:
        applied = host_view.observed_limits(facts_request.task_id) if host_view else None
    memory_report = memory_task.result()
    if memory_report.outcome is Outcome.CRASHED:
        # Inconclusive, not a failure: the canary was killed, and nothing the host saw
        # says it was the memory limit (an engine's OOM record can fail to arrive on a
        # loaded host). Once more, alone; a canary that allocates past the limit
        # (success) is a failure and never run again.
        log.warning(
            "self-check: the memory canary ended %s; running it once more",
            memory_report.error.message if memory_report.error else "crashed",
        )
        memory_report = await pipeline.run(
            TaskRequest(code=MEMORY_CANARY, items=memory_request.items)
        )
    duration_ms = (time.monotonic() - begin) * 1000
    results = evaluate(
        CanaryOutcome.from_report(facts_task.result()),
        CanaryOutcome.from_report(memory_report),
        policy,
        apparmor_profile=target.apparmor_profile,
        kernel=target.kernel,
        host=applied,
    )
    return SelfCheckReport(
        policy_sha256=policy.sha256,
        daemon_id=target.daemon.get("id", ""),
        results=results,
        checked_at=checked_at,
        duration_ms=duration_ms,
        key=target.cache_key,
    )


async def ensure_selfcheck(
    target: SelfCheckTarget,
    *,
    cache: SelfCheckCache | None = None,
    refresh: bool = False,
) -> SelfCheckReport:
    """The self-check result for ``target``: cached when one passed before, else run now.

    Raises :class:`~runner.errors.IsolationNotEnforcedError` when a required guarantee
    is not in force (the runner must not take tasks). Optional ones that are missing
    are logged as warnings and stay in the report. Only passing results are cached,
    so a failure is retried at the next start.
    """
    cache = cache if cache is not None else SelfCheckCache(None)
    key = target.cache_key
    report = None if refresh else await asyncio.to_thread(cache.get, key)
    if report is None:
        report = await run_selfcheck(target)
        log.info("self-check ran in %.0f ms: %s", report.duration_ms, report.in_force())
        if report.is_ok:
            await asyncio.to_thread(cache.put, report)
    # Said loudly when the canaries ran; a cached result (every later start of a
    # one-shot `exec`) only repeats it at INFO. The audit records carry it always.
    level = logging.INFO if report.cached else logging.WARNING
    for missing in report.missing_optional:
        log.log(
            level,
            "optional isolation guarantee %s is %s: %s",
            missing.name,
            missing.status.value,
            missing.detail,
        )
    if not report.is_ok:
        raise IsolationNotEnforcedError(
            report.failure_message(),
            hint="the runner takes no tasks; `sandbox-runner selfcheck` shows every guarantee",
        )
    return report
