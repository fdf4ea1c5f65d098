"""Lifecycle: the runner killed (SIGKILL) while a hostile task runs leaves nothing for good.

THREATS.md, resources and lifecycle: "the runner killed mid-task ... no leaked
containers". A child process runs one task through a cold pipeline: a CPU spin
that ignores SIGTERM, with a daemon double-forked out of its process group. While
the task's container runs, the child is killed with SIGKILL, so nothing of it gets
to clean up. The container outlives it (nobody is left to remove it); the next
start of the same runner id sweeps it away: its owner process is gone.

The runner killed with benign tasks, the Docker daemon restarted mid-task (on a
private second daemon) and the broker gone mid-task are
tests/integration/test_faults.py's and test_broker_cluster.py's; this one adds a
task that fights back (SIGTERM ignored, a daemon out of its process group).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid

import docker
import pytest
from helpers import owned

from runner.cli.wiring import load_isolation, make_docker_sandbox
from runner.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.timeout(300)

HOSTILE = """
import os, signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            pass
    os._exit(0)
while True:
    pass
"""

# A runner that runs the hostile task (guards off, 120 s timeout) and is killed meanwhile.
RUNNER = """
import asyncio, sys, docker
from runner.pipeline import TaskRequest
from runner.settings import Settings
from runner.cli.wiring import make_docker_sandbox, make_pipeline

async def main():
    settings = Settings(pool_size=0, stdlib_allow="*", external_allow="*", builtins_deny="",
                        block_env_access=False, task_timeout_s=120)
    sandbox = make_docker_sandbox(settings, docker.from_env(timeout=60), image=sys.argv[1],
                                  ensure_image=None, warm_pool=False)
    pipeline = make_pipeline(settings, sandbox, image=sys.argv[1], image_id=None,
                             isolation=sandbox.isolation.report())
    print("running", flush=True)
    await pipeline.run(TaskRequest(code=sys.stdin.read()))

asyncio.run(main())
"""


async def test_a_runner_killed_mid_task_leaves_a_container_the_next_start_reaps(
    base_settings: Settings, task_image: str, docker_client: docker.DockerClient
) -> None:
    runner_id = f"redteam-killed-{uuid.uuid4().hex[:8]}"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        task_image,
        cwd=PROJECT_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "SANDBOX_RUNNER_ID": runner_id},
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(HOSTILE.encode())
        child.stdin.close()
        async with asyncio.timeout(60):
            assert (await child.stdout.readline()).strip() == b"running"
        for _ in range(300):  # the task's container comes up (cold start)
            if [c for c in owned(docker_client, runner_id) if c["State"] == "running"]:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the task is spinning, its daemon forked
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    left = owned(docker_client, runner_id)
    assert len(left) == 1, left  # nobody removed it: its runner is dead
    assert left[0]["State"] == "running"

    settings = Settings(**{**base_settings.model_dump(), "runner_id": runner_id})
    restarted = make_docker_sandbox(
        settings,
        docker.from_env(timeout=60),
        image=task_image,
        ensure_image=None,
        warm_pool=False,
        isolation=load_isolation(settings),
    )
    try:
        swept = await restarted.sweep()
    finally:
        await restarted.aclose()
    assert swept == [left[0]["Id"]]
    assert owned(docker_client, runner_id) == []
