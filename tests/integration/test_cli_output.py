"""What the commands print, against the real engine: a person gets text, a program
gets one parseable thing on stdout (JSON, or a tag), progress goes to stderr."""

from __future__ import annotations

import json

import docker
from helpers import sandbox_runner

from runner.testing import runner_image


def test_sweep_speaks_text_to_people_and_json_to_programs() -> None:
    text = sandbox_runner("sweep")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(("nothing to remove", "removed "))
    as_json = sandbox_runner("sweep", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert isinstance(json.loads(as_json.stdout)["removed"], list)


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
