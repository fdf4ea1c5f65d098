"""Tenant profiles enforced: the broker names the tenant, the runner applies its own profile.

The embedded broker, its HTTP API with two API keys and the runner service run for
real in this event loop (the WebSocket protocol, the settings frame with its
``tenant``, the pipeline with the analyzer), over the fixture bundle
``tests/fixtures/tenant_policy/`` (tenant ``data``: 1024 MiB, 120 s and the
``statistics`` module; tenant ``basic``: 128 MiB, 0.5 CPUs and ``json`` only). Only
the sandbox is a recorder, so what each task was handed (its limits and guards) is
known exactly; tests/integration/test_tenants.py does the same through ``up`` with
real task containers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.broker_server.server import (
    RunningBroker,
    broker_config,
    log_tenants,
    running_broker,
)
from runner.cli.wiring import make_pipeline
from runner.errors import ConfigurationError, LimitAboveCeiling
from runner.pipeline import TaskRequest
from runner.policy import load_policy
from runner.protocol.settings import TaskLimitsRequest
from runner.sandbox.base import MIB, ExecutionResult, Limits, Outcome, TaskSpec
from runner.service import RunnerService
from runner.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TENANTS = ROOT / "tests" / "fixtures" / "tenant_policy"
TENANTS_NEXT = ROOT / "tests" / "fixtures" / "tenant_policy_next"
AUTH = "tenant-test-token-0123456789"
KEYS = {
    "data": "key-data-0123456789",
    "basic": "key-basic-0123456789",
    "acme": "key-acme-0123456789",  # no profile anywhere
    "isolated": "key-isolated-0123456789",  # a profile in tenant_policy_next/ only
}


@dataclass
class RecordingSandbox:
    """Runs nothing: records what each task was handed, answers success."""

    runs: list[tuple[TaskSpec, Limits]] = field(default_factory=list)

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        self.runs.append((spec, limits))
        return ExecutionResult(
            outcome=Outcome.SUCCESS,
            result=[{"json": {"ok": True}}],
            container_id="c1",
            durations_ms={"run": 1.0},
            details={"containerStart": "cold"},
        )

    async def cancel(self, task_id: str) -> bool:
        return False

    async def aclose(self) -> None:
        pass


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    return Settings(
        policy_dir=bundle,
        broker_host="127.0.0.1",
        broker_port=0,
        auth_token=AUTH,
        api_keys=",".join(f"{key}={tenant}" for tenant, key in KEYS.items()),
        max_concurrency=2,
        graceful_shutdown_timeout_s=2,
        runner_id="tenant-unit",
        **overrides,
    )


@dataclass
class Up:
    running: RunningBroker
    service: RunnerService
    sandbox: RecordingSandbox

    async def submit(self, tenant: str, **body: Any) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.running.url, timeout=10) as client:
            response = await client.post(
                "/v1/tasks",
                params={"wait": 10},
                headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                json={"items": [], **body},
            )
        return response.status_code, response.json()


@asynccontextmanager
async def up(bundle: Path = TENANTS, runner_bundle: Path | None = None) -> AsyncIterator[Up]:
    """``sandbox-runner up`` with a recording sandbox: the pipeline built by the wiring.
    ``runner_bundle``: the runner's own bundle, when it is not the broker's."""
    settings = settings_for(bundle)
    sandbox = RecordingSandbox()
    pipeline = make_pipeline(
        settings_for(runner_bundle or bundle),
        sandbox,
        image="task:test",
        image_id=None,
        isolation={},
    )
    async with running_broker(settings, auth_token=AUTH) as running:
        service = RunnerService(settings, pipeline, broker_uri=running.url, handle_signals=False)
        serving = asyncio.create_task(service.run())
        try:
            for _ in range(200):
                if running.broker.runner_ids():
                    break
                await asyncio.sleep(0.02)
            assert running.broker.runner_ids()
            yield Up(running, service, sandbox)
        finally:
            service.request_shutdown("test over")
            assert await asyncio.wait_for(serving, 10) == 0
            await pipeline.aclose()


def profile_sha(bundle: Path, tenant: str) -> str:
    policy = load_policy(settings_for(bundle))
    profile = policy.tenants[tenant].profile
    assert profile is not None
    return profile.sha256


async def test_a_tenant_task_runs_under_its_profile_and_its_record_names_it() -> None:
    async with up() as service:
        status, document = await service.submit(
            "data", code="import statistics\nreturn [{'json': {'m': statistics.mean([1, 2])}}]"
        )
    assert status == 200, document
    assert document["status"] == "success"
    [(spec, limits)] = service.sandbox.runs
    assert limits.memory_bytes == 1024 * MIB
    assert limits.timeout_s == 120
    assert limits.cpus == 1.0  # not in the profile: the runner's
    assert "statistics" in spec.guards.stdlib_allow  # the agent's guard, too
    assert document["audit"]["tenant"] == {
        "name": "data",
        "profile": "tenants/data.toml",
        "profileSha256": profile_sha(TENANTS, "data"),
    }
    assert document["audit"]["limits"]["memoryBytes"] == 1024 * MIB
    keys = list(document["audit"])
    assert keys.index("tenant") == keys.index("policySha256") + 1


async def test_another_tenant_is_refused_the_same_import_with_n8ns_message() -> None:
    async with up() as service:
        status, document = await service.submit(
            "basic", code="import statistics\nreturn [{'json': {}}]"
        )
    assert status == 200
    assert document["status"] == "error"
    assert document["error"]["code"] == "security_violation"
    assert document["error"]["message"] == "Security violations detected"
    assert document["error"]["description"].startswith(
        "Line 1: Import of standard library module 'statistics' is disallowed. "
        "Allowed stdlib modules: json"
    )
    assert service.sandbox.runs == []  # refused by the analyzer: no container
    assert document["audit"]["tenant"]["name"] == "basic"


async def test_a_tenant_without_a_profile_gets_the_defaults() -> None:
    async with up() as service:
        status, document = await service.submit("acme", code="return [{'json': {}}]")
    assert status == 200
    [(spec, limits)] = service.sandbox.runs
    assert limits.memory_bytes == 256 * MIB
    assert spec.guards.stdlib_allow == ("json", "math", "re")
    assert document["audit"]["tenant"] == {
        "name": "acme",
        "profile": None,
        "profileSha256": None,
    }


async def test_the_api_refuses_a_limit_above_the_tenants_naming_its_profile() -> None:
    async with up() as service:
        status, refused = await service.submit("basic", code="return []", memoryMb=512)
        allowed_status, allowed = await service.submit("data", code="return []", memoryMb=512)
    assert status == 422
    assert refused["detail"] == (
        "memoryMb 512 exceeds 128 MiB, this broker's per-task limit (the tenant's profile, "
        "tenants/basic.toml; the bundle's ceiling is 2048)"
    )
    assert allowed_status == 200, allowed
    [(_, limits)] = service.sandbox.runs
    assert limits.memory_bytes == 512 * MIB


async def test_the_runner_never_trusts_the_broker_for_a_tenants_limits() -> None:
    # A broker that lets memoryMb 512 through for basic: the runner's own profile refuses.
    async with up() as service:
        pipeline = service.service.pipeline
        basic = pipeline.profile_for("basic")
        assert basic is not None
        with pytest.raises(LimitAboveCeiling) as caught:
            service.service.limits_for(TaskLimitsRequest(memory_mb=512), basic)
        assert str(caught.value) == (
            "memoryMb 512 exceeds 128, this runner's per-task limit for tenant basic "
            "(tenant basic's profile, tenants/basic.toml)"
        )
        # A limit the profile does not set is the runner's, in the runner's words.
        with pytest.raises(LimitAboveCeiling, match="N8N_RUNNERS_TASK_TIMEOUT, or the policy"):
            service.service.limits_for(TaskLimitsRequest(timeout_seconds=90), basic)


async def test_a_runner_applies_its_own_bundle_not_the_brokers() -> None:
    # The broker's bundle gives data 1024 MiB; the runner's (good_policy/) has no profile
    # for data: the runner refuses what its broker let through, and runs data's task
    # under its own defaults, its record saying it had no profile.
    async with up(TENANTS, runner_bundle=ROOT / "tests" / "fixtures" / "good_policy") as service:
        refused_status, refused = await service.submit("data", code="return []", memoryMb=512)
        status, document = await service.submit("data", code="return []")
    assert refused_status == 200  # the broker took it: its own copy of the profile allows it
    assert refused["status"] == "error"
    assert refused["error"]["message"] == (
        "memoryMb 512 exceeds 256, this runner's per-task limit "
        "(SANDBOX_MEMORY_MB, or the policy bundle's default when unset)"
    )
    assert status == 200
    assert document["status"] == "success"
    [(_, limits)] = service.sandbox.runs
    assert limits.memory_bytes == 256 * MIB
    assert document["audit"]["tenant"] == {"name": "data", "profile": None, "profileSha256": None}


async def test_a_task_with_no_tenant_gets_the_defaults_and_a_record_as_before() -> None:
    settings = settings_for(TENANTS)
    sandbox = RecordingSandbox()
    pipeline = make_pipeline(settings, sandbox, image="task:test", image_id=None, isolation={})
    try:
        assert pipeline.profile_for(None) is None
        report = await pipeline.run(TaskRequest(code="return []"))
    finally:
        await pipeline.aclose()
    assert "tenant" not in report.audit
    [(_, limits)] = sandbox.runs
    assert limits.memory_bytes == 256 * MIB


async def test_a_profile_this_runner_cannot_honour_is_refused_not_weakened() -> None:
    # tenant_policy_next/tenants/isolated.toml asks for gVisor; this runner's is standard.
    async with up(TENANTS_NEXT) as service:
        status, document = await service.submit("isolated", code="return []")
    assert status == 200
    assert document["status"] == "error"
    assert document["error"]["code"] == "profile_unavailable"
    assert document["error"]["message"] == (
        "Tenant isolated's profile (tenants/isolated.toml) requires the gvisor runtime "
        "tier; this runner's is standard (SANDBOX_OCI_RUNTIME=runsc gives gvisor)"
    )
    assert service.sandbox.runs == []


def test_the_broker_times_a_tenants_task_by_its_profile() -> None:
    settings = settings_for(TENANTS)
    config = broker_config(settings, policy=load_policy(settings))
    assert config.default_timeout_s == 60
    assert config.tenant_timeouts_s == {"basic": 60, "data": 120}
    assert config.tenant_quotas == {"basic": 2, "data": 8}


def test_a_quota_set_in_a_profile_and_a_setting_stops_the_broker() -> None:
    settings = settings_for(TENANTS, tenant_quotas="data=3")
    with pytest.raises(ConfigurationError, match="Tenant data's quota is set twice"):
        broker_config(settings, policy=load_policy(settings))


def test_the_broker_says_at_start_which_profile_each_tenant_gets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(TENANTS)
    caplog.set_level(logging.INFO, logger="runner.broker_server.server")
    log_tenants(settings, load_policy(settings))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "tenant acme: no profile, the defaults"),
        (
            "INFO",
            f"tenant basic: profile tenants/basic.toml (sha256 {profile_sha(TENANTS, 'basic')})",
        ),
        ("INFO", f"tenant data: profile tenants/data.toml (sha256 {profile_sha(TENANTS, 'data')})"),
        ("INFO", "tenant isolated: no profile, the defaults"),
    ]
    caplog.clear()
    settings = Settings(policy_dir=TENANTS, api_keys="key-data-0123456789=data")
    log_tenants(settings, load_policy(settings))
    assert [(r.levelname, r.getMessage()) for r in caplog.records][-1] == (
        "WARNING",
        "tenant profile tenants/basic.toml: no API key of SANDBOX_API_KEYS maps to tenant basic",
    )
