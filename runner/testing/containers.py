"""runner.testing's testcontainers: the runner image as a broker, a runner, or both in one."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import uuid
from typing import Any, Self

import docker
import docker.errors
import httpx
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.waiting_utils import WaitStrategy, WaitStrategyTarget

from runner.runner_image import RUNNER_UID
from runner.sandbox.docker_errors import DOCKER_FAULTS
from runner.testing.client import Mode, SandboxServiceError, submit_task
from runner.testing.session import (
    LABEL_ROLE,
    LABEL_TESTING_RUNNER,
    STARTUP_TIMEOUT_S,
    _check_ryuk,
    docker_socket,
    reap_leftovers,
    remove_owned,
    runner_image,
    session_labels,
)

BROKER_PORT = 5679
HEALTH_PORT = 5681
CONTAINER_SOCKET = "/var/run/docker.sock"
STOP_TIMEOUT_S = 15
# The broker's task store: a tmpfs of each broker container's own (the root file system
# is read-only), owned by the image's user as the image's /var/lib/sandbox-broker is.
# Two containers never share tasks; a container's tasks go with it.
BROKER_STORE_DIR = "/var/lib/sandbox-broker"
BROKER_STORE = f"sqlite:///{BROKER_STORE_DIR}/broker-tasks.sqlite3"


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
        if "SANDBOX_BROKER_STORE" not in self.env:  # else the caller's (a volume of theirs)
            self.with_env("SANDBOX_BROKER_STORE", BROKER_STORE)
            self.tmpfs[BROKER_STORE_DIR] = f"uid={RUNNER_UID},gid={RUNNER_UID},mode=0700"
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
