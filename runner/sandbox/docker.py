"""``DockerSandbox``: task containers made by the Docker daemon.

Owns what is Docker's in a task container's life (the rest, shared with the OCI
backend, is :class:`~runner.sandbox.container.ContainerSandbox`): the rendering of
the :class:`~runner.sandbox.spec.ContainerSpec` as Docker's create request, create,
attach and start (a warm slot is all three done ahead of time), feeding the task and
reading its output over the hijacked attach stream (:func:`pump` over
:class:`~runner.sandbox.stream.StreamDemux`), ``wait``, the daemon's records of how a
container ended (``OOMKilled``, its ``kill`` events), removal, the list of our
containers for the sweep, building the image once when it is missing, and the
classification of Docker's faults (:mod:`runner.sandbox.docker_errors`).

Per-container daemon cost, where it goes (bench/README.md has the numbers): the
slowest phase is ``start`` (shim, dockerd's network hook, runc), which the pool
takes off the task's path; removal runs off the critical path; ``inspect`` runs
only on failure; and a complete successful result frame ends the exchange at once,
without waiting for the daemon to notice the exit or calling ``wait``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import HostConfig, LogConfig, Ulimit

from runner.errors import DockerUnavailableError, ImageBuildError, InfrastructureError
from runner.sandbox.base import Limits
from runner.sandbox.container import Container, ContainerSandbox, ExitFacts, Run
from runner.sandbox.docker_errors import (
    DOCKER_FAULTS,
    docker_errors,
    is_transient,
    retry_cause,
    translate,
)
from runner.sandbox.envelope import encode_task
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import LABEL_DEADLINE, LABEL_MANAGED
from runner.sandbox.pool import PoolConfig
from runner.sandbox.spec import ContainerSpec, container_spec
from runner.sandbox.stream import STDOUT, Output, StreamDemux

log = logging.getLogger(__name__)

# What a set-up attempt may fail with once its retries are spent (socket errors too).
SETUP_FAULTS: tuple[type[Exception], ...] = (*DOCKER_FAULTS, OSError)
# How long the daemon's OOM record is waited for when an OOM kill is possible (its
# event from containerd lags the exit on a loaded host), and how often it is asked.
OOM_RECORD_WAIT_S = 10.0
OOM_RECORD_POLL_S = 0.05


@dataclass
class DockerContainer(Container):
    """A Docker task container with its attach stream."""

    # docker-py hands back a file-like wrapper holding a reference to the socket;
    # both must be closed or the descriptor stays open.
    stream: Any = None
    sock: socket.socket | None = None


@dataclass(frozen=True, slots=True)
class _ExitState:
    """What the daemon recorded of an ended container; times are its clock (unix s)."""

    oom_killed: bool
    started_at: float | None = None
    finished_at: float | None = None


def _daemon_time(text: object) -> float | None:
    """An RFC 3339 time of the daemon (nanoseconds cut to microseconds) as unix seconds."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None  # absent, or Go's zero time
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def create_config(
    api: docker.APIClient,
    spec: ContainerSpec,
    image: str,
    labels: dict[str, str],
    agent_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Docker's create request for ``spec`` (the image's entrypoint runs as is, with
    ``agent_args`` after it: a pool slot's ``--preload``)."""
    config: dict[str, Any] = api.create_container_config(
        image=image,
        command=list(agent_args),  # appended to the entrypoint (tini + agent)
        user=f"{spec.uid}:{spec.gid}",
        stdin_open=True,
        tty=False,
        # network_mode "none" in the host config is the isolation; the legacy
        # NetworkDisabled flag would also leave /etc/hosts without localhost.
        hostname=spec.hostname,
        labels=labels,
        host_config=host_config(api, spec),
    )
    # Close the container's stdin when our side of the attach stream closes.
    config["StdinOnce"] = True
    return config


def security_opt(spec: ContainerSpec) -> list[str]:
    opts = [f"seccomp={spec.seccomp_json}"]
    if spec.no_new_privileges:
        opts.insert(0, "no-new-privileges:true")
    if spec.apparmor_profile:
        opts.append(f"apparmor={spec.apparmor_profile}")
    return opts


def host_config(api: docker.APIClient, spec: ContainerSpec) -> HostConfig:
    config: HostConfig = api.create_host_config(
        network_mode="none",
        read_only=spec.read_only_root,
        tmpfs={
            tmpfs.path: ",".join(
                [*tmpfs.options, f"size={tmpfs.size_bytes}", f"mode={tmpfs.mode:o}"]
            )
            for tmpfs in spec.tmpfs
        },
        cap_drop=["ALL"],
        security_opt=security_opt(spec),
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.swap_bytes,  # no swap: memory means memory
        nano_cpus=spec.nano_cpus,  # rounded, never 0 (0 would mean unlimited)
        pids_limit=spec.pids,
        ulimits=[Ulimit(name=r.name, soft=r.soft, hard=r.hard) for r in spec.rlimits],
        ipc_mode="none",
        cgroupns="private",
        # Output comes through the attach stream; a log driver would only copy it to disk.
        log_config=LogConfig(type="none"),
        init=False,  # tini from the image is PID 1
        privileged=False,
    )
    return config


class DockerSandbox(ContainerSandbox[DockerContainer]):
    """Runs each task in its own hardened container on one Docker host."""

    backend = "docker"
    engine_title = "The Docker daemon"

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        image: str,
        isolation: IsolationConfig,
        runner_id: str,
        ensure_image: Callable[[], str] | None = None,
        setup_attempts: int = 4,
        setup_backoff_max_s: float = 4.0,
        pool: PoolConfig | None = None,
        pool_limits: Limits | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            isolation=isolation,
            runner_id=runner_id,
            setup_attempts=setup_attempts,
            setup_backoff_max_s=setup_backoff_max_s,
            pool=pool,
            pool_limits=pool_limits,
            on_retry=on_retry,
        )
        self._client = client
        self._api = client.api
        self._image = image
        self._image_id: str | None = None
        self._ensure_image = ensure_image
        self._image_built = False
        self._image_lock = threading.Lock()

    # -- the image ----------------------------------------------------------------

    def _prepare(self) -> None:
        """Resolve the image's id (a retagged image changes the pool's key)."""
        try:
            # The stub leaves this one untyped; it returns the daemon's JSON answer.
            image = self._api.inspect_image(self._image)  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            self._build_image_once()
            raise
        self._image_id = str(image["Id"])

    def _build_image_once(self) -> None:
        with self._image_lock:
            if self._image_built or self._ensure_image is None:
                return
            self._image_built = True
            log.warning("task image %s is missing; building it once", self._image)
            self._image = self._ensure_image()

    def _image_ref(self) -> str | None:
        return self._image

    def _memo_salt(self) -> Any:
        return (self._image, self._image_id)

    def _shape(self, limits: Limits) -> Any:
        return [self._image_id, self._container_config(limits, labels={})]

    def _container_config(
        self, limits: Limits, labels: dict[str, str], agent_args: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        return create_config(
            self._api, container_spec(self._isolation, limits), self._image, labels, agent_args
        )

    # -- a container's life -------------------------------------------------------

    def _start(
        self, labels: dict[str, str], limits: Limits, attempt: int, agent_args: tuple[str, ...] = ()
    ) -> DockerContainer:
        """Create, attach, start. On any failure the half-made container is removed."""
        t0 = time.monotonic()
        deadline_at = t0 + float(labels[LABEL_DEADLINE]) - time.time()
        try:
            config = self._container_config(limits, labels, agent_args)
            # The stub leaves this one untyped; it returns the daemon's JSON answer.
            created = self._api.create_container_from_config(config)  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            self._build_image_once()
            raise
        container_id = created["Id"]
        t1 = time.monotonic()
        try:
            raw = self._api.attach_socket(
                container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            sock: socket.socket = getattr(raw, "_sock", raw)
        except BaseException:
            self._remove_quietly(container_id)
            raise
        t2 = time.monotonic()
        try:
            self._api.start(container_id)
        except BaseException:
            _close_stream(raw, sock)
            self._remove_quietly(container_id)
            raise
        t3 = time.monotonic()
        return DockerContainer(
            container_id=container_id,
            stream=raw,
            sock=sock,
            started_at=t3,
            attempts=attempt,
            durations_ms={
                "create": (t1 - t0) * 1000,
                "attach": (t2 - t1) * 1000,
                "start": (t3 - t2) * 1000,
            },
            deadline_at=deadline_at,
        )

    def _exchange(self, run: Run[DockerContainer]) -> Output:
        """Write the task envelope, then read stdout/stderr until the result, EOF, the cap
        or the deadline.

        A complete stdout frame that decodes to a success ends the exchange at once:
        the agent writes its one frame last, so nothing after it can change the
        outcome, and the ~30 ms the daemon takes to notice the exit (plus ``wait``)
        stay off the task's latency. Any other frame is read on to EOF, so the
        stderr tail (crash reports) and a stray second frame are still seen.
        """
        container = run.container
        assert container is not None
        sock = container.sock
        assert sock is not None
        output = Output.for_output_cap(run.limits.output_bytes)
        demux = StreamDemux()
        deadline = run.deadline
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.sendall(encode_task(run.spec, run.limits))
                sock.shutdown(socket.SHUT_WR)  # EOF on the container's stdin
            except TimeoutError:
                output.timed_out = True
            except OSError:
                pass  # the container is already gone; its exit tells why
            if not output.timed_out:
                ended = pump(sock, demux, output, deadline, until_frame=True)
                if not ended and output.has_frame():
                    output.early_result = self._early_result(run, output)
                    if output.early_result is None:
                        pump(sock, demux, output, deadline, until_frame=False)
        finally:
            _close_stream(container.stream, sock)
        if output.timed_out or output.overflow:
            self._kill_quietly(container.container_id)
        return output

    def _wait_exit(self, container: DockerContainer) -> int | None:
        """The container's exit code, or None when the daemon cannot say.

        Raises :class:`DockerUnavailableError` when the daemon cannot be reached at all
        (its socket is gone or refuses us): the caller decides what that means.
        """
        container_id = container.container_id
        try:
            status = self._api.wait(container_id, timeout=30)
            return int(status.get("StatusCode", -1))
        except requests.exceptions.ConnectionError as exc:
            log.warning("could not wait for container %s: %s", container_id[:12], exc)
            raise DockerUnavailableError("Docker daemon unreachable", hint=str(exc)) from exc
        except DOCKER_FAULTS as exc:
            log.warning("could not wait for container %s: %s", container_id[:12], exc)
            return None

    def _exit_facts(
        self, container: DockerContainer, *, attribute_kill: bool, oom_possible: bool = False
    ) -> ExitFacts:
        """The daemon's OOM record, and, for a death before any report, its kill record.

        The daemon learns of an OOM kill from containerd's event, which can reach it
        after the container's exit on a loaded host (the memory canary of a self-check
        was seen ending ``crashed`` so, at load 8, and again in a CI run with the wait
        at 3 s). When an OOM kill is possible (the agent read one in its cgroup, or the
        task child died of SIGKILL, as an OOM kill's victim does, whatever the agent
        could read), the daemon's record is waited for, up to
        :data:`OOM_RECORD_WAIT_S`: the verdict is still the daemon's, never the agent's
        claim. A task that SIGKILLs itself holds its own container that long at most,
        less than its timeout lets it anyway.
        """
        state = self._exit_state(container.container_id)
        waited_until = time.monotonic() + (OOM_RECORD_WAIT_S if oom_possible else 0.0)
        while not state.oom_killed and time.monotonic() < waited_until:
            time.sleep(OOM_RECORD_POLL_S)
            state = self._exit_state(container.container_id)
        if state.oom_killed:
            return ExitFacts(oom_killed=True)
        if not attribute_kill:
            return ExitFacts()
        return ExitFacts(outside_kill=self._outside_kill(container.container_id, state))

    def _exit_state(self, container_id: str) -> _ExitState:
        """The daemon's record of the ended container: OOM kill, start and end (its clock)."""
        try:
            state = self._api.inspect_container(container_id)["State"]
        except DOCKER_FAULTS as exc:
            log.warning("could not inspect container %s: %s", container_id[:12], exc)
            return _ExitState(oom_killed=False)
        return _ExitState(
            oom_killed=bool(state.get("OOMKilled")),
            started_at=_daemon_time(state.get("StartedAt")),
            finished_at=_daemon_time(state.get("FinishedAt")),
        )

    def _outside_kill(self, container_id: str, state: _ExitState) -> bool | None:
        """Did the daemon kill the container for someone (True), surely not (False), or
        cannot it be told (None)?

        The task runs as the agent's uid and can kill the agent itself; only a kill
        recorded by the daemon (``docker kill``/``stop``, a daemon shutdown) is from
        outside. The daemon logs a kill under the container's lock before the exit is
        processed, so its record of this container up to ``die`` holds every kill.
        It keeps only its last 256 events (moby ``daemon/events``, oldest dropped
        first): the record is complete only if it still holds this container's
        ``start``. The window is the daemon's own clock (from inspect), so a skewed
        host clock does not matter; reading stops at ``die``, and ``until`` bounds it.
        """
        if state.started_at is None or state.finished_at is None:
            return None
        started_seen = killed = False
        try:
            stream = self._api.events(
                since=math.floor(state.started_at) - 1,
                until=math.ceil(state.finished_at) + 1,
                filters={"container": container_id},
                decode=True,
            )
            try:
                for event in stream:
                    action = event.get("Action") or event.get("status")
                    if action == "start":
                        started_seen = True
                    elif action == "kill":
                        killed = True
                    elif action == "die":
                        break
            finally:
                stream.close()
        except DOCKER_FAULTS as exc:
            log.warning("could not read the events of container %s: %s", container_id[:12], exc)
            return None
        if killed:
            return True
        return False if started_seen else None

    def _kill(self, container_id: str) -> None:
        with contextlib.suppress(*DOCKER_FAULTS):
            self._api.kill(container_id)

    def _release(self, container: DockerContainer) -> None:
        if container.sock is not None:
            _close_stream(container.stream, container.sock)

    def _remove(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._api.remove_container(container_id, force=True, v=True)

    def _list_ours(self) -> list[tuple[str, dict[str, str]]]:
        with docker_errors("list containers"):
            found = self._api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
        return [(container["Id"], container.get("Labels") or {}) for container in found]

    def _is_slot_alive(self, container: DockerContainer) -> bool:
        """An idle slot's agent is silent until it gets a task: anything readable on its
        stream (output, or EOF because the container died) makes it unusable. No I/O."""
        if container.sock is None:
            return False
        try:
            readable, _, _ = select.select([container.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # -- faults -------------------------------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def _retry_cause(self, exc: BaseException | None) -> str:
        return retry_cause(exc)

    def _setup_failed(self, exc: BaseException, what: str) -> InfrastructureError | None:
        if isinstance(exc, docker.errors.ImageNotFound):
            return ImageBuildError(
                f"Task image {self._image} is missing", hint="run `sandbox-runner image build`"
            )
        if isinstance(exc, SETUP_FAULTS):
            return translate(exc, what)
        return None

    def _close(self) -> None:
        self._client.close()


def _close_stream(stream: Any, sock: socket.socket) -> None:
    for closable in (stream, sock):
        with contextlib.suppress(OSError, AttributeError):
            closable.close()


def pump(
    sock: socket.socket,
    demux: StreamDemux,
    output: Output,
    deadline: float,
    *,
    until_frame: bool,
) -> bool:
    """Read Docker's attach stream into ``output`` within its caps and ``deadline``.

    Returns True when the stream is over (EOF, deadline, cap), False when it stopped
    early because ``until_frame`` and a whole stdout frame is in (what arrived after
    it waits in ``demux`` for the next call).
    """
    sock.setblocking(False)
    pieces = demux.feed(b"")  # what an earlier call left after its frame
    while True:
        while pieces:
            stream, payload = pieces.pop(0)
            if output.add(stream, payload):
                return True
            if until_frame and stream == STDOUT and output.has_frame():
                demux.push_back(pieces)
                return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            output.timed_out = True
            return True
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            return True
        if not chunk:
            return True
        pieces = demux.feed(chunk)


def connect(timeout_s: float) -> docker.DockerClient:
    """A client for the daemon named by DOCKER_HOST (or the default socket), checked alive."""
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except DOCKER_FAULTS as exc:
        raise DockerUnavailableError(
            "Cannot reach the Docker daemon",
            hint=f"{exc}; start it (`make setup` does on Debian) or set DOCKER_HOST",
        ) from exc
    return client


def describe_daemon(client: docker.DockerClient) -> dict[str, str]:
    """Who the daemon is (id, version, kernel, security options): the self-check cache key."""
    with docker_errors("describe itself"):
        info = client.info()
    return {
        "id": str(info.get("ID", "")),
        "serverVersion": str(info.get("ServerVersion", "")),
        "kernelVersion": str(info.get("KernelVersion", "")),
        "architecture": str(info.get("Architecture", "")),
        "cgroupVersion": str(info.get("CgroupVersion", "")),
        "securityOptions": ",".join(sorted(str(o) for o in info.get("SecurityOptions") or [])),
        # Another OCI runtime (or the same name pointing elsewhere) isolates differently.
        "defaultRuntime": str(info.get("DefaultRuntime", "")),
        "runtimes": ",".join(
            f"{name}={(spec or {}).get('path', '')}"
            for name, spec in sorted((info.get("Runtimes") or {}).items())
        ),
    }


__all__ = [
    "DockerSandbox",
    "connect",
    "describe_daemon",
    "pump",
]
