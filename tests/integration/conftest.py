"""Fixtures for tests against the real engines and the real task image.

A backend-neutral test (the behaviour of a task: limits, isolation, the pool, the
service end to end) takes the ``backend`` fixture, directly or through
``make_task_pipeline``, and runs once on each engine of :data:`BACKENDS`; what is
left of a task on either engine is :func:`helpers.remains`. A test about one engine
says which and why (Docker's fault injection, its daemon, its images; the OCI
backend's own files in ``test_oci_backend.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import docker
import pytest

from runner.cli.wiring import (
    image_recipe,
    make_docker_sandbox,
    make_oci_sandbox,
    make_pipeline,
    oci_runtime,
)
from runner.errors import RunnerError
from runner.pipeline import TaskPipeline, TaskRequest
from runner.sandbox.base import Mode
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.docker import DockerSandbox, connect
from runner.sandbox.image import ImageBuilder
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import LABEL_MANAGED
from runner.settings import Settings

# The in-process guards switched off: the container alone must hold.
GUARDS_OFF = {
    "stdlib_allow": "*",
    "external_allow": "*",
    "builtins_deny": "",
    "block_env_access": False,
}

PipelineFactory = Callable[..., AbstractAsyncContextManager[TaskPipeline]]
# The engines every backend-neutral test runs on: Docker, and an OCI runtime (runc)
# driven directly. The gVisor tier (runsc) has tests of its own.
BACKENDS = ("docker", "oci")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    # Cold by default; tests of the warm pool (and the warm half of the limit tests)
    # ask for one with ``warm=True`` or ``pool_size=N``.
    return Settings(runner_id="pytest-runner", pool_size=0)


@pytest.fixture(scope="session")
def docker_client(base_settings: Settings) -> Iterator[docker.DockerClient]:
    try:
        client = connect(base_settings.docker_api_timeout_s)
    except RunnerError as exc:
        pytest.fail(f"{exc}. `make test` starts a Docker engine first.", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def task_image(docker_client: docker.DockerClient, base_settings: Settings) -> str:
    builder = ImageBuilder(docker_client, image_recipe(base_settings), lambda line: None)
    try:
        return builder.ensure()
    except RunnerError as exc:
        pytest.fail(f"cannot build the task image: {exc}", pytrace=False)


@pytest.fixture
def make_docker_pipeline(
    base_settings: Settings, task_image: str, docker_client: docker.DockerClient
) -> PipelineFactory:
    """``async with make_docker_pipeline(guards_off=True, memory_mb=64) as pipeline: ...``"""
    return pipeline_factory(base_settings, task_image)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The engine a backend-neutral test runs on (each such test runs on both)."""
    name: str = request.param
    return name


@pytest.fixture
def make_task_pipeline(
    base_settings: Settings, task_image: str, docker_client: docker.DockerClient, backend: str
) -> PipelineFactory:
    """As ``make_docker_pipeline``, on the engine of the ``backend`` fixture."""
    return pipeline_factory(base_settings, task_image, backend=backend)


def pipeline_factory(
    base_settings: Settings, task_image: str, *, backend: str = "docker"
) -> PipelineFactory:
    """The factory behind ``make_docker_pipeline``, for fixtures of a wider scope.

    ``warm=True`` gives the sandbox a pool of one slot and waits until it is ready,
    so the first task is handed a pre-started container. ``isolation`` replaces the
    policy's (e.g. Docker's default seccomp profile swapped in, to compare).
    ``backend``: ``docker`` or ``oci`` (an OCI runtime directly: ``oci_runtime`` in
    the overrides names it, runc by default).
    """

    @asynccontextmanager
    async def factory(
        *,
        guards_off: bool = False,
        client: docker.DockerClient | None = None,
        warm: bool = False,
        isolation: IsolationConfig | None = None,
        **overrides: Any,
    ) -> AsyncIterator[TaskPipeline]:
        values = {**base_settings.model_dump(), **(GUARDS_OFF if guards_off else {}), **overrides}
        if warm:
            values["pool_size"] = overrides.get("pool_size", 1)
        settings = Settings(**values)
        own_client = client or docker.from_env(timeout=60)
        sandbox = make_sandbox(backend, settings, own_client, task_image, isolation=isolation)
        pipeline = make_pipeline(
            settings,
            sandbox,
            image=task_image,
            image_id=None,
            isolation=sandbox.isolation.report(),
        )
        try:
            await sandbox.warm_up(wait=True)
            yield pipeline
        finally:
            await sandbox.aclose()
            if backend == "oci":
                own_client.close()

    return factory


def make_sandbox(
    backend: str,
    settings: Settings,
    client: docker.DockerClient,
    image: str,
    *,
    isolation: IsolationConfig | None = None,
    warm_pool: bool = True,
) -> ContainerSandbox[Any]:
    """A sandbox of ``backend`` as the commands make it (the Docker one closes
    ``client`` on ``aclose``; the OCI one only unpacks the image through it)."""
    if backend == "oci":
        runtime = oci_runtime(settings)
        if isinstance(runtime, str):
            pytest.fail(f"the OCI backend cannot run here: {runtime}", pytrace=False)
        return make_oci_sandbox(
            settings, client, runtime, image=image, isolation=isolation, warm_pool=warm_pool
        )
    assert backend == "docker", backend
    return make_docker_sandbox(
        settings, client, image=image, ensure_image=None, isolation=isolation, warm_pool=warm_pool
    )


def request(
    code: str, items: list[Any] | None = None, mode: Mode = Mode.ALL_ITEMS, **kw: Any
) -> TaskRequest:
    return TaskRequest(code=code, items=items or [], mode=mode, **kw)


def container_exists(client: docker.DockerClient, container_id: str | None) -> bool:
    assert container_id, "the report names no container"
    found = client.api.containers(all=True, filters={"id": container_id})
    return bool(found)


def containers_of_task(client: docker.DockerClient, task_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.api.containers(
        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"io.sandbox-runner.task={task_id}"]}
    )
    return found


__all__ = [
    "BACKENDS",
    "GUARDS_OFF",
    "DockerSandbox",
    "container_exists",
    "containers_of_task",
    "make_sandbox",
    "request",
]
