"""runner.testing's clean-up and image: the labels that name a test process, the reaper of
containers whose test process died, the runner image to start, the Docker socket."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import docker
import docker.errors
from testcontainers.core.config import testcontainers_config

from runner.sandbox.docker_errors import DOCKER_FAULTS
from runner.sandbox.labels import LABEL_OWNER, process_identity
from runner.testing.client import SandboxServiceError

LABEL_TESTING = "io.sandbox-runner.testing"
LABEL_TESTING_PROCESS = f"{LABEL_TESTING}.process"
LABEL_TESTING_NAMESPACE = f"{LABEL_TESTING}.pid-namespace"
LABEL_TESTING_RUNNER = f"{LABEL_TESTING}.runner-id"
LABEL_ROLE = "io.sandbox-runner.role"
DEFAULT_SOCKET = "/var/run/docker.sock"
# How long a service may take to be ready: the runner's self-check and pool come first.
STARTUP_TIMEOUT_S = 180.0


def runner_image(client: docker.DockerClient | None = None) -> str:
    """The runner image to start: ``SANDBOX_RUNNER_IMAGE``, or built from this checkout."""
    configured = os.environ.get("SANDBOX_RUNNER_IMAGE")
    if configured:
        return configured
    from runner.cli.wiring import image_recipe
    from runner.runner_image import RunnerImageBuilder, RunnerImageRecipe
    from runner.sandbox.image import ImageBuilder
    from runner.settings import PROJECT_ROOT, Settings

    if not (PROJECT_ROOT / "Dockerfile").is_file():
        raise SandboxServiceError(
            "No runner image given: pass image=..., or set SANDBOX_RUNNER_IMAGE "
            "(build one from a checkout with `make image`)"
        )
    own = client is None
    client = client or docker.from_env()
    try:
        settings = Settings()
        base = ImageBuilder(client, image_recipe(settings), lambda line: None)
        builder = RunnerImageBuilder(
            client, RunnerImageRecipe(PROJECT_ROOT), base, lambda line: None
        )
        return builder.ensure()
    finally:
        if own:
            client.close()


def _is_alive(identity: str) -> bool:
    pid, _, _ = identity.partition(":")
    return pid.isdigit() and process_identity(int(pid)) == identity


def _process_namespace() -> str:
    """Where our pids mean something: this kernel's boot and this pid namespace.

    A test process on another host, in another container or CI job sharing the daemon
    has other pids: whether it is alive cannot be judged from here.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "unknown"
    return f"{boot}/{pidns}"


def _is_orphan(labels: dict[str, str]) -> bool:
    """Made by a test process (per its labels) of our pid namespace that is gone."""
    identity = labels.get(LABEL_TESTING_PROCESS)
    if identity is None or labels.get(LABEL_TESTING_NAMESPACE) != _process_namespace():
        return False
    return not _is_alive(identity)


def session_labels() -> dict[str, str]:
    """Labels for things a test makes (a network): reaped once this process is gone."""
    return {
        LABEL_TESTING: "true",
        LABEL_TESTING_PROCESS: process_identity(os.getpid()) or f"{os.getpid()}:?",
        LABEL_TESTING_NAMESPACE: _process_namespace(),
    }


def reap_leftovers(client: docker.DockerClient) -> list[str]:
    """Remove the containers (and their task containers) of test processes that are gone."""
    removed: list[str] = []
    try:
        found = client.api.containers(all=True, filters={"label": f"{LABEL_TESTING}=true"})
    except DOCKER_FAULTS:
        return removed
    for container in found:
        labels = container.get("Labels") or {}
        if not _is_orphan(labels):
            continue
        with contextlib.suppress(*DOCKER_FAULTS):
            client.api.remove_container(container["Id"], force=True)
            removed.append(container["Id"])
        runner_id = labels.get(LABEL_TESTING_RUNNER)
        if runner_id:
            removed.extend(remove_owned(client, runner_id))
    with contextlib.suppress(*DOCKER_FAULTS):
        for network in client.networks.list(filters={"label": f"{LABEL_TESTING}=true"}):
            if _is_orphan(network.attrs.get("Labels") or {}):
                with contextlib.suppress(*DOCKER_FAULTS):
                    network.remove()
    return removed


def remove_owned(client: docker.DockerClient, runner_id: str) -> list[str]:
    """Remove every task (or pool) container still labelled with ``runner_id``."""
    removed: list[str] = []
    with contextlib.suppress(*DOCKER_FAULTS):
        for container in client.api.containers(
            all=True, filters={"label": f"{LABEL_OWNER}={runner_id}"}
        ):
            with contextlib.suppress(*DOCKER_FAULTS):
                client.api.remove_container(container["Id"], force=True)
                removed.append(container["Id"])
    return removed


def docker_socket() -> tuple[str | None, dict[str, str]]:
    """The host's Docker socket to mount (None for a TCP daemon) and the env to pass on."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host.removeprefix("unix://"), {}
    if host:
        return None, {"DOCKER_HOST": host}
    return DEFAULT_SOCKET, {}


def _check_ryuk() -> None:
    if testcontainers_config.ryuk_disabled:
        return
    client = docker.from_env()
    try:
        client.images.get(testcontainers_config.ryuk_image)
    except docker.errors.ImageNotFound:
        raise SandboxServiceError(
            f"Ryuk ({testcontainers_config.ryuk_image}) is not available here: set "
            "TESTCONTAINERS_RYUK_DISABLED=true (these containers clean up after themselves)"
        ) from None
    finally:
        client.close()
