"""What the commands print, against the real engine: a person gets text, a program
gets one parseable thing on stdout (JSON, or a tag), progress goes to stderr; and
``sweep`` sweeps the engines ``SANDBOX_BACKEND`` names."""

from __future__ import annotations

import json
import subprocess
import sys

import docker
from helpers import remains, runner_free_env, sandbox_runner

from runner.sandbox.labels import LABEL_OWNER
from runner.testing import runner_image

# A runner with a warm slot on each engine that prints the slots' ids and waits to be
# killed: its leftovers.
LEAVE_SLOTS = """
import asyncio, sys
import docker
from runner.cli.wiring import make_docker_sandbox, make_oci_sandbox, oci_runtime
from runner.settings import Settings

async def main():
    settings = Settings(runner_id=sys.argv[1], pool_size=1)
    client = docker.from_env(timeout=60)
    sandboxes = [
        make_docker_sandbox(settings, client, image=sys.argv[2], ensure_image=None),
        make_oci_sandbox(settings, client, oci_runtime(settings), image=sys.argv[2]),
    ]
    for sandbox in sandboxes:
        await sandbox.warm_up(wait=True)
        (slot,) = sandbox.pool.idle_resources()
        print(slot.container_id, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_sweep_takes_the_engines_the_backend_names_in_text_and_json(task_image: str) -> None:
    runner_id = "pytest-sweep-cli"  # one id for every run: one parent cgroup, reused
    env = {"SANDBOX_RUNNER_ID": runner_id}
    # What an interrupted earlier run of this test left (it would be counted below).
    assert sandbox_runner("sweep", env={**env, "SANDBOX_BACKEND": "auto"}).returncode == 0
    child = subprocess.Popen(
        [sys.executable, "-c", LEAVE_SLOTS, runner_id, task_image],
        stdout=subprocess.PIPE,
        text=True,
        env=runner_free_env(),
    )
    assert child.stdout is not None
    on_docker, on_oci = child.stdout.readline().strip(), child.stdout.readline().strip()
    child.kill()
    child.wait()
    child.stdout.close()
    client = docker.from_env()
    try:
        assert remains(client, container_id=on_docker) != []
        assert remains(client, container_id=on_oci) != []
        # The OCI backend's alone: Docker's leftover stays.
        as_json = sandbox_runner("sweep", "--json", env={**env, "SANDBOX_BACKEND": "oci"})
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["removed"] == [on_oci]
        assert remains(client, container_id=on_oci) == []
        assert remains(client, container_id=on_docker) != []
        # auto: both engines (the OCI one has nothing left), for a person.
        text = sandbox_runner("sweep", env={**env, "SANDBOX_BACKEND": "auto"})
        assert text.returncode == 0, text.stderr
        assert text.stdout == f"removed 1 container(s): {on_docker[:12]}\n"
        assert remains(client, labels={LABEL_OWNER: runner_id}) == []
        again = sandbox_runner("sweep", env={**env, "SANDBOX_BACKEND": "docker"})
        assert again.stdout == "nothing to remove\n", again.stderr
    finally:
        client.close()


def test_image_build_runner_prints_only_the_tag_on_stdout(
    docker_client: docker.DockerClient, task_image: str
) -> None:
    tag = runner_image(docker_client)  # built (or found) first: the command is a cache hit
    result = sandbox_runner("image", "build-runner")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tag}\n"
    assert docker_client.images.get("sandbox-runner:latest").id == docker_client.images.get(tag).id


def test_progress_is_json_in_json_mode(task_image: str) -> None:
    # `image build` finds the task image: nothing to report, and stdout is the tag alone.
    result = sandbox_runner("--log-format", "json", "image", "build")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == task_image
    for line in result.stderr.splitlines():
        assert json.loads(line)["logger"].startswith("runner")
