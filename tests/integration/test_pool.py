"""The warm pool against the real engines: one task per container, refills, ageing, keys,
clean shutdown, and the sweep's treatment of live and dead runners' slots.

Every test runs on both engines (Docker, and an OCI runtime driven directly): the pool
is the shared part of the two sandboxes, the containers it keeps are each engine's.
What the engines hold is read from their own records (:func:`helpers.engine_containers`,
:func:`helpers.remains`), the memory limit of a slot from the engine's view of it.

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
from helpers import engine_containers, remains

from runner.cli.wiring import make_pipeline
from runner.pipeline import TaskPipeline
from runner.sandbox import container as container_sandbox
from runner.sandbox.base import MIB
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.labels import LABEL_BOOT, LABEL_DEADLINE, LABEL_POOL, LABEL_TASK
from runner.sandbox.oci import cgroups
from runner.settings import Settings

from .conftest import PipelineFactory, make_sandbox, request

ROOT = Path(__file__).resolve().parents[2]
SUM = "return sum(item['json']['n'] for item in _items)"


def sandbox_of(pipeline: TaskPipeline) -> ContainerSandbox[Any]:
    sandbox = pipeline.sandbox
    assert isinstance(sandbox, ContainerSandbox)
    return sandbox


def pool_containers(client: docker.DockerClient, boot_id: str) -> dict[str, dict[str, str]]:
    """The pool slots of one sandbox on either engine: id -> labels."""
    return engine_containers(client, {LABEL_BOOT: boot_id, LABEL_POOL: None})


def is_gone(client: docker.DockerClient, container_id: str) -> bool:
    return remains(client, container_id=container_id) == []


def memory_limit_bytes(client: docker.DockerClient, backend: str, container_id: str) -> int:
    """A container's memory limit as its engine set it: Docker's record of it, or, for
    the OCI backend, the kernel's own value in the container's memory cgroup."""
    if backend == "docker":
        return int(client.api.inspect_container(container_id)["HostConfig"]["Memory"])
    root, parent = cgroups.ROOT, cgroups.PARENT
    (v1_or_v2,) = [
        *root.glob(f"memory/{parent}/*/{container_id}/memory.limit_in_bytes"),
        *root.glob(f"{parent}/*/{container_id}/memory.max"),
    ]
    return int(v1_or_v2.read_text())


async def until(pipeline: TaskPipeline, predicate: Callable[[], bool]) -> None:
    """Wait on the pool's own change notifications (no polling), bounded."""
    pool = sandbox_of(pipeline).pool
    assert pool is not None
    async with asyncio.timeout(60):
        async with pool._changed:
            await pool._changed.wait_for(predicate)


async def test_every_task_gets_its_own_pre_started_container(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_task_pipeline(pool_size=2) as pipeline:
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
            assert is_gone(docker_client, report.audit["containerId"])
        assert [r.result for r in reports] == [10, 11, 12, 13]
        ids = [report.audit["containerId"] for report in reports]
        assert len(set(ids)) == len(ids), "a pool container served two tasks"


async def test_the_pool_refills_to_its_target_after_hand_overs(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_task_pipeline(pool_size=2, pool_refill_concurrency=2) as pipeline:
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
        assert set(pool_containers(docker_client, sandbox.boot_id)) == after
        assert pool.stats().taken == 2


async def test_an_idle_container_past_its_maximum_age_is_replaced(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_task_pipeline(pool_size=1, pool_max_idle_s=1) as pipeline:
        sandbox = sandbox_of(pipeline)
        pool = sandbox.pool
        assert pool is not None
        (old,) = pool.idle_resources()
        await until(pipeline, lambda: pool.stats().expired >= 1 and pool.stats().idle == 1)
        (new,) = pool.idle_resources()
        assert new.container_id != old.container_id
        await until(pipeline, lambda: is_gone(docker_client, old.container_id))


async def test_different_limits_start_cold_and_a_shorter_timeout_stays_warm(
    make_task_pipeline: PipelineFactory,
) -> None:
    async with make_task_pipeline(pool_size=1) as pipeline:
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
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient, backend: str
) -> None:
    async with make_task_pipeline(pool_size=1) as pipeline:
        sandbox = sandbox_of(pipeline)
        pool = sandbox.pool
        assert pool is not None
        (old,) = pool.idle_resources()
        smaller = replace(pipeline.limits, memory_bytes=96 * MIB)
        sandbox.set_pool_limits(smaller)
        await sandbox.warm_up(wait=True)
        (new,) = pool.idle_resources()
        assert new.container_id != old.container_id
        assert memory_limit_bytes(docker_client, backend, new.container_id) == 96 * MIB
        report = await pipeline.run(request("return 1", limits=smaller))
        assert report.audit["details"]["containerStart"] == "warm"
        assert report.audit["containerId"] == new.container_id


async def test_a_warm_task_clock_starts_at_hand_over_not_at_container_start(
    make_task_pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a short host grace, a slot that idled longer than timeout + grace would be
    # killed at once if the host deadline counted from the container's start.
    monkeypatch.setattr(container_sandbox, "HOST_GRACE_S", 0.5)
    async with make_task_pipeline(pool_size=1, task_timeout_s=1) as pipeline:
        (slot,) = sandbox_of(pipeline).pool.idle_resources()  # type: ignore[union-attr]
        await asyncio.sleep(2.0)  # the slot idles past timeout + grace
        report = await pipeline.run(request("import time\ntime.sleep(0.3)\nreturn 'on time'"))
    assert report.result == "on time", report.document()
    assert report.audit["details"]["containerStart"] == "warm"
    assert report.audit["containerId"] == slot.container_id
    assert report.audit["details"]["poolSlotAgeMs"] >= 2000


async def test_aclose_removes_every_pool_container(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    async with make_task_pipeline(pool_size=3, pool_refill_concurrency=3) as pipeline:
        sandbox = sandbox_of(pipeline)
        await pipeline.run(request("return 1"))  # one taken: a refill is under way
        boot_id = sandbox.boot_id
        assert len(pool_containers(docker_client, boot_id)) >= 2
        assert remains(docker_client, labels={LABEL_BOOT: boot_id}) != []
    assert remains(docker_client, labels={LABEL_BOOT: boot_id}) == []


async def test_pool_containers_carry_the_task_labels_and_a_deadline_past_their_idle_age(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient
) -> None:
    started = time.time()
    async with make_task_pipeline(pool_size=1, pool_max_idle_s=120, task_timeout_s=10) as pipeline:
        sandbox = sandbox_of(pipeline)
        (labels,) = pool_containers(docker_client, sandbox.boot_id).values()
        assert labels[LABEL_TASK] == "pool"
        assert labels["io.sandbox-runner.owner"] == "pytest-runner"
        assert labels["io.sandbox-runner.seccomp-sha256"] == sandbox.isolation.seccomp_sha256
        # Idle age + task timeout + grace: the orphan sweep spares a live slot that long.
        assert float(labels[LABEL_DEADLINE]) >= started + 120 + 10


@asynccontextmanager
async def closing(
    sandbox: ContainerSandbox[Any], client: docker.DockerClient
) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await sandbox.aclose()
        client.close()  # the OCI backend's is not its own to close


async def sweep_as(backend: str, settings: Settings, image: str, runner_id: str) -> list[str]:
    """What a sweep by a sandbox of ``runner_id`` (just started: a boot of its own)
    removes."""
    client = docker.from_env(timeout=60)
    sandbox = make_sandbox(
        backend, Settings(**{**settings.model_dump(), "runner_id": runner_id}), client, image
    )
    async with closing(sandbox, client):
        return await sandbox.sweep()


async def test_a_sweep_spares_live_pool_slots_and_reaps_a_dead_runners(
    base_settings: Settings, task_image: str, docker_client: docker.DockerClient, backend: str
) -> None:
    settings = Settings(**{**base_settings.model_dump(), "pool_size": 2})
    # A live pool: another sandbox of the same runner (say, an `exec` beside the
    # service) and a sandbox of another runner both sweep; neither touches it.
    client = docker.from_env(timeout=60)
    live = make_sandbox(backend, settings, client, task_image)
    make_pipeline(settings, live, image=task_image, image_id=None, isolation={})
    async with closing(live, client):
        await live.warm_up(wait=True)
        slots = set(pool_containers(docker_client, live.boot_id))
        assert len(slots) == 2
        for runner_id in ("pytest-runner", "someone-else"):
            swept = await sweep_as(backend, base_settings, task_image, runner_id)
            assert not slots & set(swept)
        assert set(pool_containers(docker_client, live.boot_id)) == slots
        assert all(remains(docker_client, container_id=slot) for slot in slots)

    # A runner killed with its pool full: the next start of that runner reaps its slots.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DEAD_RUNNER,
        task_image,
        backend,
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
    leftovers = set(pool_containers(docker_client, boot_id))
    assert len(leftovers) == 2
    swept = await sweep_as(backend, base_settings, task_image, "pytest-dead-runner")
    assert leftovers <= set(swept)
    assert remains(docker_client, labels={LABEL_BOOT: boot_id}) == []
    for container_id in leftovers:
        assert remains(docker_client, container_id=container_id) == []


# A runner that fills a pool of two on the engine named, prints its boot id and waits
# to be killed.
DEAD_RUNNER = """
import asyncio, sys, docker
from runner.settings import Settings
from runner.cli.wiring import make_docker_sandbox, make_oci_sandbox, oci_runtime

async def main():
    settings = Settings(pool_size=2)
    client = docker.from_env(timeout=60)
    if sys.argv[2] == "oci":
        sandbox = make_oci_sandbox(settings, client, oci_runtime(settings), image=sys.argv[1])
    else:
        sandbox = make_docker_sandbox(settings, client, image=sys.argv[1], ensure_image=None)
    await sandbox.warm_up(wait=True)
    print(sandbox.boot_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
