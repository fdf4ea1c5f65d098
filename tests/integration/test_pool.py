"""The warm pool against the real engine: one task per container, refills, ageing, keys,
clean shutdown, and the sweep's treatment of live and dead runners' slots.

(Timeouts and resource attacks in pooled containers: tests/integration/test_limits.py
runs every attack both cold and warm.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest

from runner.cli.wiring import make_docker_sandbox, make_pipeline
from runner.pipeline import TaskPipeline
from runner.sandbox import container as container_sandbox
from runner.sandbox.base import MIB
from runner.sandbox.docker import DockerSandbox
from runner.sandbox.labels import LABEL_BOOT, LABEL_DEADLINE, LABEL_MANAGED, LABEL_POOL, LABEL_TASK
from runner.settings import Settings

from .conftest import PipelineFactory, container_exists, request

ROOT = Path(__file__).resolve().parents[2]
SUM = "return sum(item['json']['n'] for item in _items)"


def sandbox_of(pipeline: TaskPipeline) -> DockerSandbox:
    sandbox = pipeline.sandbox
    assert isinstance(sandbox, DockerSandbox)
    return sandbox


def pool_containers(client: docker.DockerClient, boot_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.api.containers(
        all=True,
        filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_BOOT}={boot_id}", LABEL_POOL]},
    )
    return found


async def until(pipeline: TaskPipeline, predicate: Callable[[], bool]) -> None:
    """Wait on the pool's own change notifications (no polling), bounded."""
    pool = sandbox_of(pipeline).pool
    assert pool is not None
    async with asyncio.timeout(60):
        async with pool._changed:
            await pool._changed.wait_for(predicate)


async def test_every_task_gets_its_own_pre_started_container(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_docker_pipeline(pool_size=2) as pipeline:
        sandbox = sandbox_of(pipeline)
        reports = []
        for n in range(4):
            await sandbox.warm_up(wait=True)
            reports.append(
                await pipeline.run(request(SUM, [{"json": {"n": n}}, {"json": {"n": 10}}]))
            )
        await sandbox.wait_removals()
        for report in reports:
            assert report.is_success, report.document()
            assert report.audit["details"]["containerStart"] == "warm"
            assert report.audit["details"]["poolSlotAgeMs"] >= 0
            assert "create" not in report.audit["durationsMs"]
            assert not container_exists(docker_client, report.audit["containerId"])
        assert [r.result for r in reports] == [10, 11, 12, 13]
        ids = [report.audit["containerId"] for report in reports]
        assert len(set(ids)) == len(ids), "a pool container served two tasks"


async def test_the_pool_refills_to_its_target_after_hand_overs(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_docker_pipeline(pool_size=2, pool_refill_concurrency=2) as pipeline:
        sandbox = sandbox_of(pipeline)
        pool = sandbox.pool
        assert pool is not None
        before = {c.container_id for c in pool.idle_resources()}
        assert len(before) == 2
        first, second = await asyncio.gather(
            pipeline.run(request("return 1")), pipeline.run(request("return 2"))
        )
        assert {first.audit["containerId"], second.audit["containerId"]} == before
        await sandbox.warm_up(wait=True)
        after = {c.container_id for c in pool.idle_resources()}
        assert len(after) == 2
        assert not after & before
        await sandbox.wait_removals()
        listed = {c["Id"] for c in pool_containers(docker_client, sandbox.boot_id)}
        assert listed == after
        assert pool.stats().taken == 2


async def test_an_idle_container_past_its_maximum_age_is_replaced(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_docker_pipeline(pool_size=1, pool_max_idle_s=1) as pipeline:
        sandbox = sandbox_of(pipeline)
        pool = sandbox.pool
        assert pool is not None
        (old,) = pool.idle_resources()
        await until(pipeline, lambda: pool.stats().expired >= 1 and pool.stats().idle == 1)
        (new,) = pool.idle_resources()
        assert new.container_id != old.container_id
        await until(pipeline, lambda: not container_exists(docker_client, old.container_id))


async def test_different_limits_start_cold_and_a_shorter_timeout_stays_warm(
    make_docker_pipeline: PipelineFactory,
) -> None:
    async with make_docker_pipeline(pool_size=1) as pipeline:
        sandbox = sandbox_of(pipeline)
        bigger = replace(pipeline.limits, memory_bytes=128 * MIB)
        cold = await pipeline.run(request("return 'cold'", limits=bigger))
        assert cold.result == "cold"
        assert cold.audit["details"]["containerStart"] == "cold"
        assert cold.audit["details"]["coldReason"] == "limits_or_policy_differ"
        assert cold.audit["limits"]["memoryBytes"] == 128 * MIB
        assert "create" in cold.audit["durationsMs"]
        # The timeout is not part of the container: it travels with the task.
        shorter = replace(pipeline.limits, timeout_s=3.0)
        await sandbox.warm_up(wait=True)
        warm = await pipeline.run(request("return 'warm'", limits=shorter))
        assert warm.result == "warm"
        assert warm.audit["details"]["containerStart"] == "warm"


async def test_a_changed_pool_limit_replaces_the_idle_containers(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_docker_pipeline(pool_size=1) as pipeline:
        sandbox = sandbox_of(pipeline)
        pool = sandbox.pool
        assert pool is not None
        (old,) = pool.idle_resources()
        smaller = replace(pipeline.limits, memory_bytes=96 * MIB)
        sandbox.set_pool_limits(smaller)
        await sandbox.warm_up(wait=True)
        (new,) = pool.idle_resources()
        assert new.container_id != old.container_id
        inspected = docker_client.api.inspect_container(new.container_id)
        assert inspected["HostConfig"]["Memory"] == 96 * MIB
        report = await pipeline.run(request("return 1", limits=smaller))
        assert report.audit["details"]["containerStart"] == "warm"
        assert report.audit["containerId"] == new.container_id


async def test_a_warm_task_clock_starts_at_hand_over_not_at_container_start(
    make_docker_pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a short host grace, a slot that idled longer than timeout + grace would be
    # killed at once if the host deadline counted from the container's start.
    monkeypatch.setattr(container_sandbox, "HOST_GRACE_S", 0.5)
    async with make_docker_pipeline(pool_size=1, task_timeout_s=1) as pipeline:
        (slot,) = sandbox_of(pipeline).pool.idle_resources()  # type: ignore[union-attr]
        await asyncio.sleep(2.0)  # the slot idles past timeout + grace
        report = await pipeline.run(request("import time\ntime.sleep(0.3)\nreturn 'on time'"))
    assert report.result == "on time", report.document()
    assert report.audit["details"]["containerStart"] == "warm"
    assert report.audit["containerId"] == slot.container_id
    assert report.audit["details"]["poolSlotAgeMs"] >= 2000


async def test_aclose_removes_every_pool_container(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_docker_pipeline(pool_size=3, pool_refill_concurrency=3) as pipeline:
        sandbox = sandbox_of(pipeline)
        await pipeline.run(request("return 1"))  # one taken: a refill is under way
        boot_id = sandbox.boot_id
        assert len(pool_containers(docker_client, boot_id)) >= 2
    assert pool_containers(docker_client, boot_id) == []


async def test_pool_containers_carry_the_task_labels_and_a_deadline_past_their_idle_age(
    make_docker_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    started = time.time()
    async with make_docker_pipeline(
        pool_size=1, pool_max_idle_s=120, task_timeout_s=10
    ) as pipeline:
        sandbox = sandbox_of(pipeline)
        (container,) = pool_containers(docker_client, sandbox.boot_id)
        labels = container["Labels"]
        assert labels[LABEL_TASK] == "pool"
        assert labels["io.sandbox-runner.owner"] == "pytest-runner"
        assert labels["io.sandbox-runner.seccomp-sha256"] == sandbox.isolation.seccomp_sha256
        # Idle age + task timeout + grace: the orphan sweep spares a live slot that long.
        assert float(labels[LABEL_DEADLINE]) >= started + 120 + 10


@asynccontextmanager
async def live_pool(
    settings: Settings, image: str, client: docker.DockerClient
) -> AsyncIterator[DockerSandbox]:
    sandbox = make_docker_sandbox(settings, client, image=image, ensure_image=None)
    make_pipeline(settings, sandbox, image=image, image_id=None, isolation={})
    try:
        await sandbox.warm_up(wait=True)
        yield sandbox
    finally:
        await sandbox.aclose()


async def test_a_sweep_spares_live_pool_slots_and_reaps_a_dead_runners(
    base_settings: Settings, task_image: str, docker_client: docker.DockerClient
) -> None:
    settings = Settings(**{**base_settings.model_dump(), "pool_size": 2})
    # A live pool: another sandbox of the same runner (say, an `exec` beside the
    # service) and a sandbox of another runner both sweep; neither touches it.
    async with live_pool(settings, task_image, docker.from_env(timeout=60)) as live:
        isolation = live.isolation
        slots = {c["Id"] for c in pool_containers(docker_client, live.boot_id)}
        assert len(slots) == 2
        for runner_id in ("pytest-runner", "someone-else"):
            other = DockerSandbox(
                docker.from_env(timeout=60),
                image=task_image,
                isolation=isolation,
                runner_id=runner_id,
            )
            try:
                swept = await other.sweep()
            finally:
                await other.aclose()
            assert not slots & set(swept)
        assert {c["Id"] for c in pool_containers(docker_client, live.boot_id)} == slots

    # A runner killed with its pool full: the next start of that runner reaps its slots.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DEAD_RUNNER,
        task_image,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "SANDBOX_RUNNER_ID": "pytest-dead-runner"},
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(120):
            boot_id = (await child.stdout.readline()).decode().strip()
        assert boot_id, "the child runner did not start"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    leftovers = {c["Id"] for c in pool_containers(docker_client, boot_id)}
    assert len(leftovers) == 2
    restarted = DockerSandbox(
        docker.from_env(timeout=60),
        image=task_image,
        isolation=isolation,
        runner_id="pytest-dead-runner",
    )
    try:
        swept = await restarted.sweep()
    finally:
        await restarted.aclose()
    assert leftovers <= set(swept)
    assert pool_containers(docker_client, boot_id) == []


# A runner that fills a pool of two, prints its boot id and waits to be killed.
DEAD_RUNNER = """
import asyncio, sys, docker
from runner.settings import Settings
from runner.cli.wiring import make_docker_sandbox

async def main():
    settings = Settings(pool_size=2)
    sandbox = make_docker_sandbox(
        settings, docker.from_env(timeout=60), image=sys.argv[1], ensure_image=None
    )
    await sandbox.warm_up(wait=True)
    print(sandbox.boot_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
