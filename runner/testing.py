"""testcontainers for sandbox-runner: a real sandbox service in your pytest, in one line.

::

    from runner.testing import SandboxContainer

    with SandboxContainer() as sandbox:
        document = sandbox.run_task("return [{'json': {'n': len(_items)}}]", items=[{"a": 1}])
        assert document["result"] == [{"json": {"n": 1}}]

- :class:`SandboxContainer`: the runner image running ``sandbox-runner up``, the
  embedded broker and one runner in one container. The simple case.

For wiring runners to a broker, the pair:

- :class:`EmbeddedBrokerContainer`: the runner image running ``sandbox-runner broker``
  (the HTTP API and the runner endpoint on one port), on a network of its own. It
  runs no task by itself: give it a runner.
- :class:`SandboxRunnerContainer`: the runner image running ``sandbox-runner serve``,
  wired to a broker (an :class:`EmbeddedBrokerContainer` or a :class:`SandboxContainer`,
  or any broker by URI and auth token).

The containers that run tasks (:class:`SandboxContainer`, :class:`SandboxRunnerContainer`)
reach the Docker API through the mounted socket (or ``DOCKER_HOST``); the task
containers they create are their siblings on the host's daemon and never get the socket.

All are context managers that wait until the service is ready (the broker answers; a
runner is connected to its broker), and all have ``run_task(code, items=None,
mode="all_items")``, which returns the document ``sandbox-runner exec`` prints, and
``metrics()`` (Prometheus text). ``run_task`` fails fast, with
:class:`SandboxServiceError` saying so, when the broker has no runner connected for
:data:`NO_RUNNER_GRACE_S` (it cancels the task first).

Clean-up does not depend on Ryuk (set ``TESTCONTAINERS_RYUK_DISABLED=true`` where
its image cannot be pulled): on exit the service is stopped with SIGTERM (a runner
drains and removes its warm pool), then every container still labelled with its
runner id (``io.sandbox-runner.owner``) is removed, and the network. Containers of a
test process that died are reaped when the next one starts (labels
``io.sandbox-runner.testing.*`` name the process).

The image: ``image=...``, else ``SANDBOX_RUNNER_IMAGE``, else the one built from
this source checkout (``make image``; built here when missing, cached by input hash).

Needs the ``testing`` extra (``pip install 'sandbox-runner[testing]'``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Self

import docker
import docker.errors
import httpx
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.waiting_utils import WaitStrategy, WaitStrategyTarget

from runner.sandbox.docker_errors import DOCKER_FAULTS
from runner.sandbox.labels import LABEL_OWNER, process_identity

LABEL_TESTING = "io.sandbox-runner.testing"
LABEL_TESTING_PROCESS = f"{LABEL_TESTING}.process"
LABEL_TESTING_NAMESPACE = f"{LABEL_TESTING}.pid-namespace"
LABEL_TESTING_RUNNER = f"{LABEL_TESTING}.runner-id"
LABEL_ROLE = "io.sandbox-runner.role"
BROKER_PORT = 5679
HEALTH_PORT = 5681
CONTAINER_SOCKET = "/var/run/docker.sock"
DEFAULT_SOCKET = "/var/run/docker.sock"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15
# run_task gives up this long after submission when the broker has had no runner all the
# time (a runner that connects meanwhile starts the count again): a broker nobody serves
# would otherwise hold the caller for the whole timeout and say nothing.
NO_RUNNER_GRACE_S = 3.0
# Long-poll lengths: short while nobody could take the task, so the grace is noticed.
SHORT_WAIT_S = 1.0
LONG_WAIT_S = 30.0
NO_RUNNER_HELP = (
    "Add one: SandboxRunnerContainer(broker) next to an EmbeddedBrokerContainer, or "
    "SandboxContainer() instead (the broker and a runner in one container); outside "
    "testcontainers, `sandbox-runner serve` with N8N_RUNNERS_TASK_BROKER_URI set to the "
    "broker's URL and N8N_RUNNERS_AUTH_TOKEN to its auth token."
)
Mode = Literal["all_items", "per_item", "runOnceForAllItems", "runOnceForEachItem"]


class SandboxServiceError(RuntimeError):
    """The service in the container did not start, or a task could not be run through it
    (refused, no runner connected to the broker, not finished in time)."""


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


class _ServiceReady(WaitStrategy):
    """Ready when the service's ``probe`` passes; fails at once if the container exits."""

    def __init__(self, service: _SandboxContainer, timeout_s: float) -> None:
        super().__init__()
        self._service = service
        self.with_startup_timeout(int(timeout_s))

    def wait_until_ready(self, container: WaitStrategyTarget) -> None:
        deadline = time.monotonic() + self._startup_timeout
        reason = "not started"
        while time.monotonic() < deadline:
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status in ("exited", "dead"):
                raise SandboxServiceError(
                    f"{self._service.role} container exited during start-up:\n"
                    + self._service.logs()[-4000:]
                )
            ok, reason = self._service.probe()
            if ok:
                return
            time.sleep(0.25)
        raise SandboxServiceError(
            f"{self._service.role} not ready after {self._startup_timeout:.0f}s ({reason}):\n"
            + self._service.logs()[-4000:]
        )


class _SandboxContainer(DockerContainer):
    """What our containers share: image, labels, hardening, network, clean-up; and, for
    those that run tasks, the Docker API and a runner id of their own."""

    role = "service"
    runs_tasks = False  # creates task containers (sandbox-runner serve or up)

    def __init__(
        self,
        image: str | None,
        *,
        network: Network | None,
        startup_timeout_s: float,
        env: dict[str, str] | None,
    ) -> None:
        self._client = docker.from_env()
        super().__init__(image or runner_image(self._client))
        self.instance = f"{self.role}-{uuid.uuid4().hex[:10]}"
        self.network = network
        self._own_network: Network | None = None
        self._startup_timeout_s = startup_timeout_s
        # Owner label of its task containers: what the clean-up looks for.
        self.runner_id = f"testcontainers-{self.instance}" if self.runs_tasks else None
        for key, value in (env or {}).items():
            self.with_env(key, value)

    # -- configuration ------------------------------------------------------------------

    def _harden(self) -> None:
        """The last step of configuring: container options (``with_kwargs`` replaces them)."""
        labels = {**session_labels(), LABEL_ROLE: self.role}
        extra: dict[str, Any] = {}
        if self.runner_id is not None:
            labels[LABEL_TESTING_RUNNER] = self.runner_id
            extra = self._reach_docker(self.runner_id)
        # The service needs no privilege at all; its writable places are tmpfs.
        self.tmpfs.update({"/tmp": "", "/var/lib/sandbox-runner": ""})  # noqa: S108 (a tmpfs)
        self.with_kwargs(
            labels=labels,
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            **extra,
        )

    def _reach_docker(self, runner_id: str) -> dict[str, Any]:
        """Let the service create task containers; the container options that takes."""
        socket_path, socket_env = docker_socket()
        self.with_env("SANDBOX_RUNNER_ID", runner_id)
        for key, value in socket_env.items():
            self.env.setdefault(key, value)  # a DOCKER_HOST of the caller's env= wins
        if socket_path is None:
            return {}
        self.with_volume_mapping(socket_path, CONTAINER_SOCKET, "rw")
        # The service user is not root: the socket's group lets it in.
        return {"group_add": [str(os.stat(socket_path).st_gid)]}

    def _ensure_network(self) -> Network:
        if self.network is None:
            self._own_network = Network(docker_network_kw={"labels": session_labels()}).create()
            self.network = self._own_network
        return self.network

    # -- life ---------------------------------------------------------------------------

    def start(self) -> Self:
        _check_ryuk()
        reap_leftovers(self._client)
        network = self._ensure_network()
        self.with_network(network).with_network_aliases(self.instance)
        self.waiting_for(_ServiceReady(self, self._startup_timeout_s))
        super().start()
        return self

    def stop(self, force: bool = True, delete_volume: bool = True) -> None:
        container = self._container
        if container is not None:
            with contextlib.suppress(*DOCKER_FAULTS):
                container.stop(timeout=STOP_TIMEOUT_S)  # SIGTERM: drain, remove the pool
        with contextlib.suppress(*DOCKER_FAULTS):
            super().stop(force, delete_volume)
        if self.runner_id is not None:
            # Backstop: anything the runner could not remove before it stopped.
            remove_owned(self._client, self.runner_id)
        if self._own_network is not None:
            with contextlib.suppress(*DOCKER_FAULTS):
                self._own_network.remove()
            self._own_network = None
        self._client.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    # -- reading ------------------------------------------------------------------------

    def logs(self) -> str:
        if self._container is None:
            return ""
        with contextlib.suppress(*DOCKER_FAULTS):
            return bytes(self._container.logs()).decode("utf-8", "replace")
        return ""

    def url_of(self, port: int) -> str:
        """``http://host:port`` of a container port, as seen from this (the test) process."""
        return f"http://{self.get_container_host_ip()}:{self.get_exposed_port(port)}"

    def probe(self) -> tuple[bool, str]:
        raise NotImplementedError

    def _get(self, url: str, **kwargs: Any) -> httpx.Response | None:
        try:
            return httpx.get(url, timeout=5, **kwargs)
        except httpx.HTTPError:
            return None


class EmbeddedBrokerContainer(_SandboxContainer):
    """``sandbox-runner broker`` in the runner image: HTTP API + runner endpoint, one port.

    It runs no task itself: wire a :class:`SandboxRunnerContainer` to it (or use a
    :class:`SandboxContainer`, which is this broker with a runner inside).
    """

    role = "broker"
    subcommand = "broker"
    default_startup_timeout_s = 60.0

    def __init__(
        self,
        image: str | None = None,
        *,
        network: Network | None = None,
        startup_timeout_s: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if startup_timeout_s is None:
            startup_timeout_s = self.default_startup_timeout_s
        super().__init__(image, network=network, startup_timeout_s=startup_timeout_s, env=env)
        self.auth_token = secrets.token_urlsafe(24)
        self.api_key = secrets.token_urlsafe(24)
        self.with_command([self.subcommand, "--host", "0.0.0.0", "--port", str(BROKER_PORT)])  # noqa: S104
        self.with_env("SANDBOX_AUTH_TOKEN", self.auth_token)
        # Reached through a published port, so not from loopback: the API needs a key.
        self.with_env("SANDBOX_API_KEYS", f"{self.api_key}=default")
        self.with_exposed_ports(BROKER_PORT)
        self._harden()

    @property
    def url(self) -> str:
        """The broker as the test process reaches it."""
        return self.url_of(BROKER_PORT)

    @property
    def internal_url(self) -> str:
        """The broker as containers on its network reach it."""
        return f"http://{self.instance}:{BROKER_PORT}"

    def probe(self) -> tuple[bool, str]:
        response = self._get(f"{self.url}/healthz")
        if response is None or response.status_code != 200:
            return False, "no answer on /healthz"
        return True, "ok"

    def runners(self) -> list[str]:
        """Ids of the runners connected now."""
        response = httpx.get(f"{self.url}/v1/health", headers=self._auth(), timeout=10)
        response.raise_for_status()
        return list(response.json()["runners"])

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def run_task(
        self,
        code: str,
        items: list[Any] | None = None,
        mode: Mode = "all_items",
        *,
        timeout_s: float = 120.0,
        **options: Any,
    ) -> dict[str, Any]:
        """Submit a task and wait for its document (the one ``sandbox-runner exec`` prints).

        ``options``: more fields of ``POST /v1/tasks`` (``continueOnFail``,
        ``timeoutSeconds``, ``memoryMb``, ``cpus``, ``query``, ...). With no runner
        connected it fails within seconds (see :func:`submit_task`).
        """
        return submit_task(
            self.url, self.api_key, code, items=items, mode=mode, timeout_s=timeout_s, **options
        )

    def metrics(self) -> str:
        """The broker's Prometheus metrics (text format)."""
        response = httpx.get(f"{self.url}/metrics", headers=self._auth(), timeout=10)
        response.raise_for_status()
        return response.text


def submit_task(
    api_url: str,
    api_key: str | None,
    code: str,
    *,
    items: list[Any] | None = None,
    mode: Mode = "all_items",
    timeout_s: float = 120.0,
    no_runner_grace_s: float = NO_RUNNER_GRACE_S,
    **options: Any,
) -> dict[str, Any]:
    """``POST /v1/tasks`` on a broker's API and wait (polling) for the task's document.

    Fails fast when nobody can run it: once the broker has had no runner connected for
    ``no_runner_grace_s`` (counted from submission; a runner that connects meanwhile
    starts the count again), the task is cancelled and :class:`SandboxServiceError`
    says that no runner is connected and how to add one. A task not finished within
    ``timeout_s`` is cancelled too, and the error says what it was waiting for.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"code": code, "items": items or [], "mode": mode, **options}
    submitted = time.monotonic()
    deadline = submitted + timeout_s
    last_runner_seen = submitted
    with httpx.Client(base_url=api_url, headers=headers, timeout=LONG_WAIT_S + 10) as client:
        # A short first wait: with no runner, a long one would hide it.
        response = client.post(
            "/v1/tasks", params={"wait": min(SHORT_WAIT_S, timeout_s)}, json=body
        )
        if response.status_code not in (200, 202):
            raise SandboxServiceError(f"submit failed: {response.status_code} {response.text}")
        while response.status_code == 202:
            state: dict[str, Any] = response.json()
            now = time.monotonic()
            no_runner = _waits_for_a_runner(state)
            if not no_runner:
                last_runner_seen = now
            elif now - last_runner_seen >= no_runner_grace_s:
                _cancel(client, state["taskId"])
                raise SandboxServiceError(
                    f"No runner is connected to this broker ({api_url}): the task waited "
                    f"{now - submitted:.1f}s and was cancelled. {NO_RUNNER_HELP}"
                )
            if now >= deadline:
                _cancel(client, state["taskId"])
                raise SandboxServiceError(
                    f"task did not finish within {timeout_s:.0f}s and was cancelled "
                    f"(it was {_describe(state)})"
                )
            wait = min(SHORT_WAIT_S if no_runner else LONG_WAIT_S, deadline - now)
            response = client.get(f"/v1/tasks/{state['taskId']}", params={"wait": wait})
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def _waits_for_a_runner(state: dict[str, Any]) -> bool:
    """Whether a task state from the API says no runner is connected (``waitReason``)."""
    reason = state.get("waitReason")
    return isinstance(reason, dict) and reason.get("code") == "no_runner"


def _describe(state: dict[str, Any]) -> str:
    reason = state.get("waitReason")
    if isinstance(reason, dict) and reason.get("message"):
        return f"{state.get('status')}: {reason['message']}"
    return str(state.get("status"))


def _cancel(client: httpx.Client, task_id: str) -> None:
    # Nothing is left queued behind an error we raise (best effort: the broker may be gone).
    with contextlib.suppress(httpx.HTTPError):
        client.delete(f"/v1/tasks/{task_id}", timeout=10)


class SandboxContainer(EmbeddedBrokerContainer):
    """``sandbox-runner up`` in the runner image: the embedded broker and one runner,
    in one container. The simple case: ``with SandboxContainer() as sandbox:``.

    Ready when its broker answers and its runner is connected (after the runner's
    isolation self-check and warm pool). It is an :class:`EmbeddedBrokerContainer`
    (``url``, ``api_key``, ``auth_token``, ``runners()``), so more
    :class:`SandboxRunnerContainer` can join it. ``env`` sets more variables of the
    service (``SANDBOX_POOL_SIZE``, ``N8N_RUNNERS_MAX_CONCURRENCY``, ...).
    """

    role = "sandbox"
    subcommand = "up"
    runs_tasks = True
    default_startup_timeout_s = STARTUP_TIMEOUT_S  # the runner's self-check and pool first

    def probe(self) -> tuple[bool, str]:
        ok, reason = super().probe()
        if not ok:
            return False, f"{reason} (self-check, task image, warm pool)"
        response = self._get(f"{self.url}/v1/health", headers=self._auth())
        if response is None or response.status_code != 200 or not response.json()["runners"]:
            return False, "its runner is not connected to its broker yet"
        return True, "ok"

    def metrics(self) -> str:
        """Prometheus metrics (text format) of the broker and of its runner, in one scrape:
        ``up`` keeps both in one registry (``sandbox_broker_*`` and ``sandbox_runner_*``)."""
        return super().metrics()


class SandboxRunnerContainer(_SandboxContainer):
    """``sandbox-runner serve`` in the runner image, wired to a broker.

    ``broker``: an :class:`EmbeddedBrokerContainer` (the runner joins its network), or
    give ``broker_uri`` and ``auth_token`` of any broker the container can reach (n8n,
    or a broker in the test process; ``api_url``/``api_key`` make ``run_task`` work).
    ``env`` sets more variables (``N8N_RUNNERS_MAX_CONCURRENCY``, ``SANDBOX_POOL_SIZE``, ...).
    """

    role = "runner"
    runs_tasks = True

    def __init__(
        self,
        broker: EmbeddedBrokerContainer | None = None,
        image: str | None = None,
        *,
        broker_uri: str | None = None,
        auth_token: str | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        network: Network | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        if broker is None and (broker_uri is None or auth_token is None):
            raise ValueError("give a broker container, or broker_uri and auth_token")
        super().__init__(
            image,
            network=network or (broker.network if broker is not None else None),
            startup_timeout_s=startup_timeout_s,
            env=env,
        )
        self.broker = broker
        self._broker_uri = broker_uri
        self._auth_token = auth_token
        self._api_url = api_url
        self._api_key = api_key
        self.with_command(["serve"])
        self.with_exposed_ports(HEALTH_PORT)
        self._harden()

    def start(self) -> Self:
        if self.broker is not None:
            self.network = self.broker.network
            self.with_env("N8N_RUNNERS_TASK_BROKER_URI", self.broker.internal_url)
            self.with_env("N8N_RUNNERS_AUTH_TOKEN", self.broker.auth_token)
        else:
            assert self._broker_uri is not None
            assert self._auth_token is not None
            self.with_env("N8N_RUNNERS_TASK_BROKER_URI", self._broker_uri)
            self.with_env("N8N_RUNNERS_AUTH_TOKEN", self._auth_token)
        return super().start()

    @property
    def health_url(self) -> str:
        return self.url_of(HEALTH_PORT)

    def probe(self) -> tuple[bool, str]:
        response = self._get(f"{self.health_url}/healthz")
        if response is None or response.status_code != 200:
            return False, "health endpoint not answering (self-check, image, warm pool)"
        if "Connected to broker" not in self.logs():
            return False, "not connected to the broker yet"
        return True, "ok"

    def run_task(
        self,
        code: str,
        items: list[Any] | None = None,
        mode: Mode = "all_items",
        *,
        timeout_s: float = 120.0,
        **options: Any,
    ) -> dict[str, Any]:
        """Run a task through this runner's broker; the document ``exec`` prints."""
        if self.broker is not None:
            return self.broker.run_task(code, items, mode, timeout_s=timeout_s, **options)
        if self._api_url is None:
            raise SandboxServiceError("run_task needs the broker's api_url (and api_key)")
        return submit_task(
            self._api_url,
            self._api_key,
            code,
            items=items,
            mode=mode,
            timeout_s=timeout_s,
            **options,
        )

    def metrics(self) -> str:
        """The runner's Prometheus metrics (text format), from its health-check server."""
        response = httpx.get(f"{self.health_url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text


class _ServiceProcess:
    """A ``sandbox-runner`` command as a child process of this Python, configured like an
    operator would: environment variables only; the caller's own ``N8N_*``/``SANDBOX_*``
    variables are not inherited. Its output is kept in :attr:`lines` (the last
    ``keep_lines`` of them, when given)."""

    def __init__(
        self, argv: list[str], env: dict[str, str], *, keep_lines: int | None = None
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "SANDBOX_"))}
        full_env.update(env)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._line_added = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner", *argv],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._line_added:
                self.lines.append(line.rstrip("\n"))
                self._line_added.notify_all()
        with self._line_added:
            self._line_added.notify_all()

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """The first output line starting with ``prefix``; SandboxServiceError if the
        process exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        with self._line_added:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise SandboxServiceError(
                        f"no line starting with {prefix!r} within {timeout_s:.0f}s:\n"
                        + self.output[-4000:]
                    )
                self._line_added.wait(min(remaining, 1.0))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_mib(self) -> float:
        """The process's resident memory now, in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
        return round(kib / 1024, 1)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM (the graceful drain), SIGKILL after ``timeout_s``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    async def aclose(self, timeout_s: float = 20) -> int:
        """:meth:`stop` without blocking the event loop an in-process broker runs on."""
        return await asyncio.to_thread(self.stop, timeout_s)


class ServeProcess(_ServiceProcess):
    """``sandbox-runner serve`` as a child process, for a broker you run yourself (e.g.
    :func:`runner.broker_server.server.running_broker` in your test's event loop)."""

    def __init__(
        self,
        broker_url: str,
        auth_token: str,
        env: dict[str, str] | None = None,
        *,
        keep_lines: int | None = None,
    ) -> None:
        super().__init__(
            ["serve"],
            {
                **(env or {}),
                "N8N_RUNNERS_TASK_BROKER_URI": broker_url,
                "N8N_RUNNERS_AUTH_TOKEN": auth_token,
            },
            keep_lines=keep_lines,
        )


UP_LINE = "sandbox-runner is up: POST "


class UpProcess(_ServiceProcess):
    """``sandbox-runner up`` (the embedded broker and one runner in one process) as a
    child process on a free loopback port; :attr:`url` is its API once it is up.

    ``env`` configures it (``SANDBOX_API_KEYS``, ``SANDBOX_STDLIB_ALLOW``, ...).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        keep_lines: int | None = None,
    ) -> None:
        super().__init__(
            ["up", "--host", "127.0.0.1", "--port", "0"], env or {}, keep_lines=keep_lines
        )
        try:
            line = self.wait_for_line(UP_LINE, startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix(UP_LINE).split()[0].removesuffix("/v1/tasks")


__all__ = [
    "EmbeddedBrokerContainer",
    "SandboxContainer",
    "SandboxRunnerContainer",
    "SandboxServiceError",
    "ServeProcess",
    "UpProcess",
    "reap_leftovers",
    "remove_owned",
    "runner_image",
    "session_labels",
    "submit_task",
]
