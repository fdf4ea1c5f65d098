"""deploy/compose/compose.yaml, brought up on this machine with docker-compose: two brokers
on one Redis, two runners that know both brokers, and a task posted to one broker is
answered by the other.

- the file as shipped, only its variables set: the runner image of this checkout, a
  Redis image made here (no registry: the task image's Debian base and the host's
  ``redis-server`` package; ``REDIS_IMAGE`` names another), secrets of this run, ports
  free a moment ago, the Docker socket's group, a project name of its own;
- both brokers answer ``/healthz`` on their published ports and both runners connect
  (two runner ids across the brokers' ``/v1/health``);
- a task posted to broker-a is read, finished, from broker-b, and broker-a gives the
  same document: the queue and the results are Redis's, not one broker's. It ran in one
  of the compose file's runners (its audit record's ``runnerId`` is that container's
  hostname);
- ``down -v`` removes it all (containers, network, Redis's volume), and the runners
  leave no task container (what is left is removed by its owner label, and fails the
  test).

Needs the Redis task store (``SANDBOX_BROKER_STORE=redis://``) and several broker URIs
in ``N8N_RUNNERS_TASK_BROKER_URI`` in the runner image.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import httpx
import pytest
from helpers import free_port, owned, runner_free_env

from runner.cli.wiring import image_recipe
from runner.errors import RunnerError
from runner.sandbox.docker_errors import DOCKER_FAULTS
from runner.sandbox.image import ImageBuilder, docker_build
from runner.settings import PROJECT_ROOT, Settings
from runner.testing import SandboxServiceError, docker_socket, remove_owned, runner_image

pytestmark = [pytest.mark.usefixtures("task_image"), pytest.mark.timeout(900)]

COMPOSE_FILE = PROJECT_ROOT / "deploy" / "compose" / "compose.yaml"
BROKERS = ("broker-a", "broker-b")
RUNNERS = ("runner-1", "runner-2")
# `up -d` returns once every service is started, the runners after both brokers are
# healthy (their depends_on); the runners' self-check and warm pool come after.
UP_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 240.0
TASK_TIMEOUT_S = 120.0
DOWN_TIMEOUT_S = 120.0
# What the Redis image needs beyond the base (redis-tools: redis-cli and the binary that
# redis-server links to; the libraries the base lacks), from the host's apt.
REDIS_PACKAGES = ("redis-server", "redis-tools", "libjemalloc2", "liblzf1", "libatomic1")
REDIS_REPOSITORY = "sandbox-runner-redis-test"
# As the official image: redis-server and redis-cli on the PATH, user 999, /data its own.
# The packages are unpacked, not installed: their maintainer scripts want systemd and
# adduser, and only /usr is taken (a /lib entry would replace the base's /lib symlink).
REDIS_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY debs/ /tmp/debs/
RUN set -eu; \\
    for deb in /tmp/debs/*.deb; do dpkg-deb -x "$deb" /tmp/root; done; \\
    cp -a /tmp/root/usr/. /usr/; \\
    rm -rf /tmp/debs /tmp/root; \\
    ldconfig; \\
    groupadd --gid 999 redis; \\
    useradd --no-log-init --uid 999 --gid 999 --home-dir /data --shell /usr/sbin/nologin redis; \\
    install -d -o 999 -g 999 -m 0700 /data; \\
    redis-server --version; \\
    redis-cli --version
USER 999:999
WORKDIR /data
CMD ["redis-server"]
"""
CODE = "return [{'json': {'sum': sum(i['json']['n'] for i in _items)}}]"
ITEMS = [{"n": 1}, {"n": 2}, {"n": 3}]

T = TypeVar("T")


# -- images --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_image(docker_client: docker.DockerClient, base_settings: Settings) -> str:
    """``REDIS_IMAGE``, else one built here: the task image's Debian base plus the host's
    Redis packages (``apt-get download``), tagged by a hash of what went in."""
    configured = os.environ.get("REDIS_IMAGE")
    if configured:
        return configured
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        pytest.fail("no apt-get here to fetch redis-server: set REDIS_IMAGE", pytrace=False)
    base = ImageBuilder(docker_client, image_recipe(base_settings), lambda line: None)
    try:
        base_id = base.ensure_base()
    except RunnerError as exc:
        pytest.fail(f"no base image for Redis: {exc}", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="sandbox-redis-debs-") as tmp:
        debs = Path(tmp)
        download = subprocess.run(
            [apt_get, "download", "--quiet", *REDIS_PACKAGES],
            cwd=debs,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        got = sorted(debs.glob("*.deb"))
        if download.returncode != 0 or len(got) != len(REDIS_PACKAGES):
            pytest.fail(
                f"apt-get download {' '.join(REDIS_PACKAGES)} failed: "
                f"{download.stderr.strip()[-500:]} (or set REDIS_IMAGE)",
                pytrace=False,
            )
        inputs = hashlib.sha256(REDIS_DOCKERFILE.encode() + base_id.encode())
        for deb in got:
            inputs.update(deb.name.encode())
        tag = f"{REDIS_REPOSITORY}:{inputs.hexdigest()[:16]}"
        if base.image_id(tag) is not None:
            return tag
        try:
            docker_build(
                docker_client,
                _context(got),
                tag,
                what="the Redis test image",
                network=False,  # everything is in the context
                buildargs={"BASE_IMAGE": base.base_tag},
                progress=lambda line: None,
            )
        except RunnerError as exc:
            pytest.fail(str(exc), pytrace=False)
    return tag


def _context(debs: list[Path]) -> io.BytesIO:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        dockerfile = REDIS_DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        for deb in debs:
            tar.add(deb, arcname=f"debs/{deb.name}")
    context.seek(0)
    return context


@pytest.fixture(scope="module")
def sandbox_runner_image(docker_client: docker.DockerClient) -> str:
    try:
        return runner_image(docker_client)
    except (SandboxServiceError, RunnerError) as exc:
        pytest.fail(f"no runner image: {exc}", pytrace=False)


# -- the compose project ----------------------------------------------------------------------


class ComposeProject:
    """deploy/compose/compose.yaml under a project name of its own, with ``variables``
    (and nothing of the developer's own runner settings) in docker-compose's environment."""

    def __init__(self, variables: dict[str, str]) -> None:
        executable = shutil.which("docker-compose")
        if executable is None:
            pytest.fail("docker-compose is not installed (make setup installs it)", pytrace=False)
        self.name = f"sandbox-deploy-{uuid.uuid4().hex[:10]}"
        self._command = [executable, "--project-name", self.name, "--file", str(COMPOSE_FILE)]
        self._env = {**runner_free_env(), **variables}

    def run(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._command, *args],
            capture_output=True,
            text=True,
            env=self._env,
            timeout=timeout_s,
            check=False,
        )

    def container_ids(self, *services: str) -> list[str]:
        done = self.run("ps", "-q", *services, timeout_s=60)
        return done.stdout.split()

    def logs(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.run("logs", "--no-color", "--tail", "60", timeout_s=60).stdout
        return "(no logs: docker-compose logs timed out)"


@pytest.fixture
def project(
    docker_client: docker.DockerClient, sandbox_runner_image: str, redis_image: str
) -> Iterator[tuple[ComposeProject, dict[str, str]]]:
    """The project and its variables. Afterwards: the services' last log lines printed
    (shown on failure), ``down -v``, and nothing of it left: no container, volume or
    network of the project, no task container of its runners."""
    socket_path, _ = docker_socket()
    if socket_path is None:
        pytest.fail("the compose file mounts a Unix socket; DOCKER_HOST is not one", pytrace=False)
    variables = {
        "SANDBOX_RUNNER_IMAGE": sandbox_runner_image,
        "REDIS_IMAGE": redis_image,
        "SANDBOX_AUTH_TOKEN": secrets.token_hex(32),
        "SANDBOX_API_KEYS": f"{secrets.token_hex(24)}=default",
        "REDIS_PASSWORD": secrets.token_hex(32),
        "DOCKER_SOCKET": socket_path,
        "DOCKER_GID": str(os.stat(socket_path).st_gid),
        "BROKER_A_PORT": str(free_port()),
        "BROKER_B_PORT": str(free_port()),
        "SANDBOX_POOL_SIZE": "1",  # two runners on a small host
    }
    compose = ComposeProject(variables)
    left: list[str] = []
    try:
        yield compose, variables
    finally:
        runner_ids = _hostnames(docker_client, compose.container_ids(*RUNNERS))
        print(compose.logs())
        down = compose.run(
            "down", "--volumes", "--remove-orphans", "--timeout", "30", timeout_s=DOWN_TIMEOUT_S
        )
        print(f"down: exit {down.returncode}\n{down.stderr[-2000:]}")
        for runner_id in runner_ids:
            # Stopped (SIGTERM), a runner removes its warm pool and task containers.
            left += [str(c["Names"]) for c in owned(docker_client, runner_id)]
            remove_owned(docker_client, runner_id)
    ours = {"label": f"com.docker.compose.project={compose.name}"}
    left += [str(c["Names"]) for c in docker_client.api.containers(all=True, filters=ours)]
    left += [str(v.name) for v in docker_client.volumes.list(filters=ours)]
    left += [str(n.name) for n in docker_client.networks.list(filters=ours)]
    assert not left, f"left behind: {left}"


def _hostnames(client: docker.DockerClient, container_ids: list[str]) -> set[str]:
    """The containers' hostnames: a runner's id (SANDBOX_RUNNER_ID is left unset)."""
    names = set()
    for container_id in container_ids:
        with contextlib.suppress(*DOCKER_FAULTS):
            names.add(str(client.api.inspect_container(container_id)["Config"]["Hostname"]))
    return names


def _poll(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def _answer(call: Callable[[], httpx.Response]) -> httpx.Response | None:
    try:
        return call()
    except httpx.HTTPError:
        return None


def _is_healthy(client: httpx.Client) -> bool:
    response = _answer(functools.partial(client.get, "/healthz"))
    return response is not None and response.status_code == 200


def _runner_ids(client: httpx.Client) -> set[str]:
    """The runners connected to this broker now (none while it does not answer)."""
    response = _answer(functools.partial(client.get, "/v1/health"))
    if response is None or response.status_code != 200:
        return set()
    return {str(runner) for runner in response.json()["runners"]}


# -- the test -----------------------------------------------------------------------------------


def test_a_task_posted_to_one_broker_is_answered_by_the_other(
    project: tuple[ComposeProject, dict[str, str]], docker_client: docker.DockerClient
) -> None:
    compose, variables = project
    up = compose.run("up", "--detach", timeout_s=UP_TIMEOUT_S)
    assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr[-4000:]}"

    key = variables["SANDBOX_API_KEYS"].partition("=")[0]
    urls = {
        "broker-a": f"http://127.0.0.1:{variables['BROKER_A_PORT']}",
        "broker-b": f"http://127.0.0.1:{variables['BROKER_B_PORT']}",
    }
    with contextlib.ExitStack() as stack:
        clients = {
            name: stack.enter_context(
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            )
            for name, url in urls.items()
        }
        for name, client in clients.items():
            _poll(functools.partial(_is_healthy, client), READY_TIMEOUT_S, f"{name} /healthz")

        def connected() -> set[str]:
            ids = set().union(*(_runner_ids(client) for client in clients.values()))
            return ids if len(ids) == len(RUNNERS) else set()

        _poll(connected, READY_TIMEOUT_S, "both runners connected to the brokers")

        body = {"code": CODE, "items": ITEMS, "mode": "all_items"}
        submitted = clients["broker-a"].post("/v1/tasks", json=body)
        assert submitted.status_code in (200, 202), submitted.text
        task_id = submitted.json()["taskId"]

        def finished_on_b() -> dict[str, Any] | None:
            response = clients["broker-b"].get(f"/v1/tasks/{task_id}", params={"wait": 20})
            assert response.status_code in (200, 202), response.text
            if response.status_code == 200:
                document: dict[str, Any] = response.json()
                return document
            return None

        document = _poll(finished_on_b, TASK_TIMEOUT_S, f"task {task_id} on broker-b")
        assert document["status"] == "success", document
        assert document["result"] == [{"json": {"sum": 6}}]
        from_a = clients["broker-a"].get(f"/v1/tasks/{task_id}")
        assert from_a.status_code == 200, from_a.text
        assert from_a.json() == document

    runner_ids = _hostnames(docker_client, compose.container_ids(*RUNNERS))
    assert len(runner_ids) == len(RUNNERS), runner_ids
    assert document["audit"]["runnerId"] in runner_ids
