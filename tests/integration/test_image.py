"""The task image: tagged by its inputs, and buildable from an ordinary registry base.

Docker only: Docker builds the task image for both engines (the OCI backend unpacks
the image Docker built; tests/integration/test_oci_backend.py runs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from runner.cli.wiring import make_docker_sandbox, make_pipeline
from runner.pipeline import TaskRequest
from runner.sandbox.base import Outcome
from runner.sandbox.image import ImageBuilder, ImageRecipe
from runner.settings import PROJECT_ROOT, Settings

REGISTRY_LIKE_BASE = "sandbox-runner-test/registry-base:bookworm-no-tini"


@pytest.fixture(scope="module")
def registry_like_base(docker_client: docker.DockerClient, task_image: str) -> Iterator[str]:
    """A stand-in for a registry image: plain Debian with python3 and apt, no tini.

    No registry is reachable here, so it is derived from our bootstrapped base with
    tini removed; the Dockerfile must then install tini from the distribution.
    """
    base = ImageBuilder(docker_client, recipe(None), lambda _: None)._recipe.base_tag
    container = docker_client.containers.run(base, ["dpkg", "--purge", "tini"], detach=True)
    try:
        container.wait(timeout=60)
        container.commit(*REGISTRY_LIKE_BASE.split(":"))
    finally:
        container.remove(force=True)
    yield REGISTRY_LIKE_BASE
    docker_client.images.remove(REGISTRY_LIKE_BASE, force=True)


def recipe(base_image: str | None, image_dir: Path = PROJECT_ROOT / "sandbox_image") -> ImageRecipe:
    return ImageRecipe(
        image_dir=image_dir, base_image=base_image, debian_suite="bookworm", debian_mirror=None
    )


def test_tag_is_stable_and_changes_with_the_inputs(
    docker_client: docker.DockerClient, task_image: str, tmp_path: Path
) -> None:
    builder = ImageBuilder(docker_client, recipe(None), lambda _: None)
    assert builder.current_tag() == task_image
    assert builder.ensure() == task_image  # up to date: nothing rebuilt

    changed = tmp_path / "sandbox_image"
    import shutil

    shutil.copytree(PROJECT_ROOT / "sandbox_image", changed)
    dockerfile = changed / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# a change\n")
    other = ImageBuilder(docker_client, recipe(None, changed), lambda _: None).current_tag()
    assert other is not None
    assert other != task_image


async def test_builds_from_a_registry_base_given_as_build_argument(
    docker_client: docker.DockerClient, registry_like_base: str
) -> None:
    progress: list[str] = []
    builder = ImageBuilder(docker_client, recipe(registry_like_base), progress.append)
    tag = builder.ensure()
    try:
        assert not any("bootstrapping" in line for line in progress)
        assert any("tini" in line for line in progress), "tini came from the distribution"
        image = docker_client.images.get(tag)
        assert image.labels["io.sandbox-runner.role"] == "task"
        assert image.attrs["Config"]["User"] == "10001:10001"

        settings = Settings(runner_id="pytest-runner")
        sandbox = make_docker_sandbox(
            settings, docker.from_env(timeout=60), image=tag, ensure_image=None
        )
        pipeline = make_pipeline(settings, sandbox, image=tag, image_id=None, isolation={})
        try:
            report = await pipeline.run(TaskRequest(code="return [{'json': {'ok': 1}}]"))
        finally:
            await sandbox.aclose()
        assert report.outcome is Outcome.SUCCESS, report.document()
        assert report.result == [{"json": {"ok": 1}}]
    finally:
        docker_client.images.remove(tag, force=True)
