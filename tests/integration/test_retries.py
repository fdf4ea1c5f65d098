"""Set-up failures are retried; user failures never are.

Faults are injected by a proxy in front of the real Docker API socket, so the
real docker SDK raises its real exceptions and a real container runs in the end.
Docker only: the faults are the Docker API's, injected between the SDK and the
daemon; the OCI backend has no API on its task path to put a proxy in (its set-up
faults are a runtime command's: a timeout is retried, a refusal is not).
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from runner.errors import ContainerSetupError, DockerUnavailableError
from runner.sandbox.base import Outcome

from .conftest import PipelineFactory, containers_of_task, request
from .fault_proxy import DockerFaultProxy

CREATE = r"^/v[\d.]+/containers/create"
START = r"^/v[\d.]+/containers/[0-9a-f]+/start"


@pytest.fixture
def proxy() -> Iterator[DockerFaultProxy]:
    proxy = DockerFaultProxy()
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_client(proxy: DockerFaultProxy) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=proxy.base_url, timeout=60)
    yield client
    client.close()


async def test_transient_create_failure_is_retried_and_the_task_succeeds(
    make_docker_pipeline: PipelineFactory,
    proxy: DockerFaultProxy,
    proxied_client: docker.DockerClient,
    docker_client: docker.DockerClient,
) -> None:
    proxy.inject("POST", CREATE, times=1, status=500)
    async with make_docker_pipeline(client=proxied_client) as pipeline:
        report = await pipeline.run(request("return [{'json': {'ok': True}}]"))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == [{"json": {"ok": True}}]
    assert report.audit["details"]["setupAttempts"] == 2
    assert proxy.count("POST", CREATE) == 2
    assert containers_of_task(docker_client, report.task_id) == []


async def test_transient_start_failure_is_retried_and_the_half_made_container_removed(
    make_docker_pipeline: PipelineFactory,
    proxy: DockerFaultProxy,
    proxied_client: docker.DockerClient,
    docker_client: docker.DockerClient,
) -> None:
    proxy.inject("POST", START, times=1, status=503)
    async with make_docker_pipeline(client=proxied_client) as pipeline:
        report = await pipeline.run(request("return 1"))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.audit["details"]["setupAttempts"] == 2
    assert proxy.count("POST", CREATE) == 2
    assert containers_of_task(docker_client, report.task_id) == []


async def test_user_exception_is_not_retried(
    make_docker_pipeline: PipelineFactory,
    proxy: DockerFaultProxy,
    proxied_client: docker.DockerClient,
) -> None:
    async with make_docker_pipeline(client=proxied_client) as pipeline:
        report = await pipeline.run(request("raise ValueError('boom')"))
    assert report.outcome is Outcome.USER_ERROR
    assert report.error is not None
    assert report.error.message == "boom"
    assert report.audit["details"]["setupAttempts"] == 1
    assert proxy.count("POST", CREATE) == 1
    assert proxy.count("POST", START) == 1


async def test_persistent_daemon_failure_gives_up_with_a_clear_error(
    make_docker_pipeline: PipelineFactory,
    proxy: DockerFaultProxy,
    proxied_client: docker.DockerClient,
) -> None:
    proxy.inject("POST", CREATE, times=100, status=500)
    async with make_docker_pipeline(
        client=proxied_client, setup_attempts=3, setup_backoff_max_s=0.2
    ) as pipeline:
        with pytest.raises(DockerUnavailableError, match="Docker daemon failed"):
            await pipeline.run(request("return 1"))
    assert proxy.count("POST", CREATE) == 3


async def test_client_error_from_docker_is_not_retried(
    make_docker_pipeline: PipelineFactory,
    proxy: DockerFaultProxy,
    proxied_client: docker.DockerClient,
) -> None:
    proxy.inject("POST", CREATE, times=100, status=400)
    async with make_docker_pipeline(client=proxied_client) as pipeline:
        with pytest.raises(ContainerSetupError, match="Docker refused"):
            await pipeline.run(request("return 1"))
    assert proxy.count("POST", CREATE) == 1


async def test_missing_image_is_built_once_then_the_set_up_retried(
    base_settings, docker_client: docker.DockerClient, task_image: str
) -> None:
    from runner.cli.wiring import make_docker_sandbox, make_pipeline

    builds: list[str] = []

    def ensure_image() -> str:
        builds.append("built")
        return task_image

    sandbox = make_docker_sandbox(
        base_settings,
        docker.from_env(timeout=60),
        image="sandbox-runner-task:missing-on-purpose",
        ensure_image=ensure_image,
    )
    pipeline = make_pipeline(base_settings, sandbox, image=task_image, image_id=None, isolation={})
    try:
        first = await pipeline.run(request("return 'first'"))
        second = await pipeline.run(request("return 'second'"))
    finally:
        await sandbox.aclose()
    assert (first.result, second.result) == ("first", "second")
    assert builds == ["built"]
    assert first.audit["details"]["setupAttempts"] == 2
    assert second.audit["details"]["setupAttempts"] == 1
