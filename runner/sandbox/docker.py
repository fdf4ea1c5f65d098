"""``DockerSandbox``: one fresh, hardened, short-lived container per task.

Owns: the container's hardened configuration, its life (create, attach, start,
feed the task, read the capped output, wait, remove), labels and the sweep of our
leftovers, the classification of Docker failures, and the tenacity retry of
**set-up** failures only. Translates docker/requests exceptions into
:mod:`runner.errors` here, at the edge, with ``raise ... from exc``.

Retry boundary: everything before the task envelope is written to the container's
stdin is set-up and may be retried (a fresh container each time); once the
envelope is written the user's code may be running, and nothing is retried.

Every blocking Docker call runs in a worker thread (``asyncio.to_thread``); one
task's whole blocking life runs in one worker thread, so the event loop never
waits on the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import HostConfig, LogConfig, Ulimit
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from runner.errors import (
    ContainerSetupError,
    DockerUnavailableError,
    ImageBuildError,
    InfrastructureError,
)
from runner.sandbox.base import ExecutionResult, Limits, Outcome, Stage, TaskError, TaskSpec
from runner.sandbox.envelope import encode_task
from runner.sandbox.interpret import ProcessFacts, interpret

log = logging.getLogger(__name__)

LABEL = "io.sandbox-runner"
LABEL_MANAGED = f"{LABEL}.managed"
LABEL_OWNER = f"{LABEL}.owner"
LABEL_BOOT = f"{LABEL}.boot"
LABEL_TASK = f"{LABEL}.task"
LABEL_CREATED = f"{LABEL}.created-at"
LABEL_DEADLINE = f"{LABEL}.deadline"
LABEL_POLICY = f"{LABEL}.seccomp-sha256"
LABEL_PROCESS = f"{LABEL}.process"

SANDBOX_USER = "10001:10001"
STDERR_TAIL_BYTES = 64 * 1024
ENVELOPE_OVERHEAD_BYTES = 1024 * 1024
# Past the task timeout the agent reports a timeout itself; the host deadline is
# the wall behind it (for an agent that cannot report) and kills the container.
HOST_GRACE_S = 5.0
# A container whose deadline passed this long ago is an orphan, whoever owns it.
ORPHAN_MARGIN_S = 60.0
STREAM_STDOUT, STREAM_STDERR = 1, 2


def process_identity(pid: int) -> str | None:
    """``pid:start-time`` of a live process (start time defeats pid reuse), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after ')'.
    fields = stat.rpartition(")")[2].split()
    return f"{pid}:{fields[19]}" if len(fields) > 19 else None


def host_has_apparmor() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def is_transient(exc: BaseException) -> bool:
    """Set-up failures worth another attempt: daemon unreachable, 5xx, 409, timeouts."""
    if isinstance(exc, docker.errors.ImageNotFound):
        return True  # the image is (re)built once, then the set-up is retried
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        return status >= 500 or status == 409
    return isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | docker.errors.DockerException
        | ConnectionError
        | TimeoutError,
    ) and not isinstance(exc, docker.errors.APIError)


def translate(exc: BaseException, what: str) -> InfrastructureError:
    """Docker/requests exceptions -> our tree, once, at the edge."""
    if isinstance(exc, InfrastructureError):
        return exc
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        detail = exc.explanation or str(exc)
        if status >= 500:
            return DockerUnavailableError(f"Docker daemon failed to {what}", hint=str(detail))
        return ContainerSetupError(f"Docker refused to {what}", hint=str(detail))
    return DockerUnavailableError(
        f"Docker daemon unreachable while trying to {what}", hint=str(exc) or type(exc).__name__
    )


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """What every task container gets, fixed for the life of the sandbox."""

    seccomp_profile: Path
    seccomp_json: str
    seccomp_sha256: str
    apparmor_profile: str | None
    user: str = SANDBOX_USER

    @classmethod
    def load(cls, seccomp_profile: Path, apparmor_profile: str | None) -> IsolationConfig:
        raw = seccomp_profile.read_bytes()
        compact = json.dumps(json.loads(raw), separators=(",", ":"))
        return cls(
            seccomp_profile=seccomp_profile,
            seccomp_json=compact,
            seccomp_sha256=hashlib.sha256(raw).hexdigest(),
            apparmor_profile=apparmor_profile if host_has_apparmor() else None,
        )

    def security_opt(self) -> list[str]:
        opts = ["no-new-privileges:true", f"seccomp={self.seccomp_json}"]
        if self.apparmor_profile:
            opts.append(f"apparmor={self.apparmor_profile}")
        return opts

    def report(self) -> dict[str, Any]:
        """The guarantees requested for every task (for the audit record)."""
        return {
            "network": "none",
            "readOnlyRootfs": True,
            "capabilities": "all dropped",
            "noNewPrivileges": True,
            "seccomp": {"profile": str(self.seccomp_profile), "sha256": self.seccomp_sha256},
            "apparmor": self.apparmor_profile or "unavailable (host kernel has no AppArmor)",
            "user": self.user,
            "init": "tini (from the image)",
            "ipc": "none",
            "cgroupns": "private",
            "environment": "empty (image defaults only)",
            "mounts": "tmpfs /tmp only",
        }


@dataclass
class _Run:
    """Mutable state of one task's container while it lives (one worker thread)."""

    spec: TaskSpec
    limits: Limits
    container_id: str | None = None
    sock: socket.socket | None = None
    # docker-py hands back a file-like wrapper holding a reference to the socket;
    # both must be closed or the descriptor stays open.
    stream: Any = None
    started_at: float = 0.0
    attempts: int = 0
    durations_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Output:
    stdout: bytearray = field(default_factory=bytearray)
    stderr_tail: bytearray = field(default_factory=bytearray)
    stderr_bytes: int = 0
    overflow: bool = False
    timed_out: bool = False


class DockerSandbox:
    """Runs each task in its own hardened container on one Docker host."""

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
    ) -> None:
        self._client = client
        self._api = client.api
        self._image = image
        self._isolation = isolation
        self._runner_id = runner_id
        self._boot_id = uuid.uuid4().hex[:12]
        self._process = process_identity(os.getpid()) or f"{os.getpid()}:?"
        self._ensure_image = ensure_image
        self._image_built = False
        self._image_lock = threading.Lock()
        self._setup_attempts = setup_attempts
        self._setup_backoff_max_s = setup_backoff_max_s
        self._running: dict[str, str] = {}
        self._cancelled: set[str] = set()
        self._removals: set[asyncio.Future[None]] = set()
        self.retries_logged = 0

    @property
    def boot_id(self) -> str:
        return self._boot_id

    @property
    def isolation(self) -> IsolationConfig:
        return self._isolation

    # -- public API ---------------------------------------------------------------

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        run = _Run(spec, limits)
        try:
            result = await asyncio.to_thread(self._run_blocking, run)
        finally:
            if run.container_id is not None:
                self._schedule_removal(run.container_id)
            self._running.pop(spec.task_id, None)
        return result

    async def cancel(self, task_id: str) -> bool:
        """Kill the task's container; its ``run`` then ends with outcome ``cancelled``."""
        container_id = self._running.get(task_id)
        self._cancelled.add(task_id)
        if container_id is None:
            return False
        await asyncio.to_thread(self._kill_quietly, container_id)
        return True

    async def sweep(self) -> list[str]:
        """Remove our leftovers: earlier boots of this runner, and orphans past deadline."""
        return await asyncio.to_thread(self._sweep_blocking)

    async def aclose(self) -> None:
        """Wait for pending removals, so nothing outlives the sandbox."""
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        await asyncio.to_thread(self._client.close)

    # -- one task, blocking, in a worker thread -----------------------------------

    def _run_blocking(self, run: _Run) -> ExecutionResult:
        begin = time.monotonic()
        self._set_up_with_retries(run)
        assert run.container_id is not None
        assert run.sock is not None
        self._running[run.spec.task_id] = run.container_id
        if run.spec.task_id in self._cancelled:
            self._kill_quietly(run.container_id)
        output = self._exchange(run)
        waited = time.monotonic()
        exit_code = self._wait_exit(run.container_id, output)
        oom_killed = False
        facts_needed = output.timed_out or output.overflow
        stdout = bytes(output.stdout)
        result = interpret(
            stdout,
            ProcessFacts(
                exit_code=exit_code,
                timed_out=output.timed_out,
                output_overflow=output.overflow,
                stderr_tail=output.stderr_tail.decode("utf-8", "replace"),
            ),
            run.limits,
        )
        if not result.outcome.is_success and not facts_needed:
            # Only a failure needs the daemon's OOM verdict; success skips the call.
            oom_killed = self._oom_killed(run.container_id)
            if oom_killed:
                result = interpret(
                    stdout,
                    ProcessFacts(
                        exit_code=exit_code,
                        oom_killed=True,
                        stderr_tail=output.stderr_tail.decode("utf-8", "replace"),
                    ),
                    run.limits,
                )
        if run.spec.task_id in self._cancelled:
            self._cancelled.discard(run.spec.task_id)
            result = ExecutionResult(
                outcome=Outcome.CANCELLED,
                error=TaskError(Outcome.CANCELLED, "Task was cancelled", has_description=False),
                prints=result.prints,
            )
        end = time.monotonic()
        run.durations_ms["run"] = (waited - run.started_at) * 1000
        run.durations_ms["wait"] = (end - waited) * 1000
        run.durations_ms["sandboxTotal"] = (end - begin) * 1000
        details = dict(result.details)
        details.update(
            {
                "exitCode": exit_code,
                "oomKilled": oom_killed,
                "setupAttempts": run.attempts,
                "stdoutBytes": len(stdout),
                "stderrBytes": output.stderr_bytes,
            }
        )
        return replace(
            result,
            container_id=run.container_id,
            image_id=self._image,
            durations_ms={**result.durations_ms, **run.durations_ms},
            details=details,
        )

    def _set_up_with_retries(self, run: _Run) -> None:
        retrying = Retrying(
            stop=stop_after_attempt(self._setup_attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=self._setup_backoff_max_s, jitter=0.2),
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    run.attempts = attempt.retry_state.attempt_number
                    self._set_up_once(run)
        except docker.errors.ImageNotFound as exc:
            raise ImageBuildError(
                f"Task image {self._image} is missing", hint="run `sandbox-runner image build`"
            ) from exc
        except (
            docker.errors.DockerException,
            requests.exceptions.RequestException,
            OSError,
        ) as exc:
            raise translate(exc, "set up the task container") from exc

    def _log_retry(self, state: RetryCallState) -> None:
        self.retries_logged += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "container set-up failed (attempt %d of %d), retrying: %s: %s",
            state.attempt_number,
            self._setup_attempts,
            type(exc).__name__,
            exc,
        )

    def _set_up_once(self, run: _Run) -> None:
        """Create, attach, start. On any failure the half-made container is removed."""
        labels = self._labels(run)
        t0 = time.monotonic()
        try:
            config = self._api.create_container_config(
                image=self._image,
                command=[],  # the image's entrypoint (tini + agent) takes no arguments
                user=self._isolation.user,
                stdin_open=True,
                tty=False,
                # network_mode "none" in the host config is the isolation; the legacy
                # NetworkDisabled flag would also leave /etc/hosts without localhost.
                hostname="sandbox",
                labels=labels,
                host_config=self._host_config(run.limits),
            )
            # Close the container's stdin when our side of the attach stream closes.
            config["StdinOnce"] = True
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
        run.container_id, run.sock, run.stream, run.started_at = container_id, sock, raw, t3
        run.durations_ms.update(
            {"create": (t1 - t0) * 1000, "attach": (t2 - t1) * 1000, "start": (t3 - t2) * 1000}
        )

    def _build_image_once(self) -> None:
        with self._image_lock:
            if self._image_built or self._ensure_image is None:
                return
            self._image_built = True
            log.warning("task image %s is missing; building it once", self._image)
            self._image = self._ensure_image()

    def _labels(self, run: _Run) -> dict[str, str]:
        now = time.time()
        deadline = now + run.limits.timeout_s + HOST_GRACE_S
        return {
            LABEL_MANAGED: "true",
            LABEL_OWNER: self._runner_id,
            LABEL_BOOT: self._boot_id,
            LABEL_TASK: run.spec.task_id,
            LABEL_CREATED: datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            LABEL_DEADLINE: f"{deadline:.0f}",
            LABEL_POLICY: self._isolation.seccomp_sha256,
            LABEL_PROCESS: self._process,
        }

    def _host_config(self, limits: Limits) -> HostConfig:
        tmpfs_opts = f"rw,noexec,nosuid,nodev,size={limits.tmpfs_bytes},mode=1777"
        config: HostConfig = self._api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": tmpfs_opts},  # noqa: S108 - the container's own private tmpfs
            cap_drop=["ALL"],
            security_opt=self._isolation.security_opt(),
            mem_limit=limits.memory_bytes,
            memswap_limit=limits.memory_bytes,  # no swap: memory means memory
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            ulimits=[
                Ulimit(name="nofile", soft=limits.nofile, hard=limits.nofile),
                Ulimit(name="fsize", soft=limits.fsize_bytes, hard=limits.fsize_bytes),
                Ulimit(name="nproc", soft=limits.nproc, hard=limits.nproc),
                Ulimit(name="core", soft=0, hard=0),
            ],
            ipc_mode="none",
            cgroupns="private",
            # Output comes through the attach stream; a log driver would only copy it to disk.
            log_config=LogConfig(type="none"),
            init=False,  # tini from the image is PID 1
            privileged=False,
        )
        return config

    def _exchange(self, run: _Run) -> _Output:
        """Write the task envelope, then read stdout/stderr until EOF, the cap or the deadline."""
        assert run.sock is not None
        assert run.container_id is not None
        sock, output = run.sock, _Output()
        deadline = run.started_at + run.limits.timeout_s + HOST_GRACE_S
        stdout_cap = run.limits.output_bytes + ENVELOPE_OVERHEAD_BYTES
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
                self._pump(sock, output, deadline, stdout_cap, run.limits.output_bytes)
        finally:
            _close_stream(run.stream, sock)
        if output.timed_out or output.overflow:
            self._kill_quietly(run.container_id)
        return output

    @staticmethod
    def _pump(
        sock: socket.socket, output: _Output, deadline: float, stdout_cap: int, stderr_cap: int
    ) -> None:
        """Demultiplex Docker's attach stream (8-byte frame headers) with caps and a deadline."""
        pending = bytearray()
        sock.setblocking(False)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                output.timed_out = True
                return
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            while len(pending) >= 8:
                stream, size = pending[0], int.from_bytes(pending[4:8], "big")
                if len(pending) < 8 + size:
                    break
                payload = bytes(pending[8 : 8 + size])
                del pending[: 8 + size]
                if stream == STREAM_STDOUT:
                    output.stdout += payload
                    if len(output.stdout) > stdout_cap:
                        output.overflow = True
                        return
                else:
                    output.stderr_bytes += len(payload)
                    output.stderr_tail += payload
                    del output.stderr_tail[:-STDERR_TAIL_BYTES]
                    if output.stderr_bytes > stderr_cap:
                        output.overflow = True
                        return

    def _wait_exit(self, container_id: str, output: _Output) -> int | None:
        try:
            status = self._api.wait(container_id, timeout=30)
            return int(status.get("StatusCode", -1))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not wait for container %s: %s", container_id[:12], exc)
            return None

    def _oom_killed(self, container_id: str) -> bool:
        try:
            state = self._api.inspect_container(container_id)["State"]
            return bool(state.get("OOMKilled"))
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False

    # -- cleanup ------------------------------------------------------------------

    def _schedule_removal(self, container_id: str) -> None:
        """Remove off the critical path; ``aclose`` waits for every pending removal."""
        future = asyncio.ensure_future(asyncio.to_thread(self._remove_quietly, container_id))
        self._removals.add(future)
        future.add_done_callback(self._removals.discard)

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self._api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            # The sweep (on start and periodically) removes it later; say so.
            log.warning("could not remove container %s: %s", container_id[:12], exc)

    def _kill_quietly(self, container_id: str) -> None:
        with contextlib.suppress(
            docker.errors.DockerException, requests.exceptions.RequestException
        ):
            self._api.kill(container_id)

    def _sweep_blocking(self) -> list[str]:
        try:
            containers = self._api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise translate(exc, "list containers") from exc
        now, removed = time.time(), []
        for container in containers:
            labels = container.get("Labels") or {}
            # An earlier run of this runner whose process is gone (a concurrent `exec`
            # with the same runner id is alive and keeps its containers).
            stale_boot = (
                labels.get(LABEL_OWNER) == self._runner_id
                and labels.get(LABEL_BOOT) != self._boot_id
                and not _is_alive_identity(labels.get(LABEL_PROCESS, ""))
            )
            try:
                past_deadline = float(labels.get(LABEL_DEADLINE, "0")) + ORPHAN_MARGIN_S < now
            except ValueError:
                past_deadline = True
            if stale_boot or past_deadline:
                self._remove_quietly(container["Id"])
                removed.append(container["Id"])
        if removed:
            log.info("swept %d leftover task container(s)", len(removed))
        return removed


def _close_stream(stream: Any, sock: socket.socket) -> None:
    for closable in (stream, sock):
        with contextlib.suppress(OSError, AttributeError):
            closable.close()


def _is_alive_identity(identity: str) -> bool:
    pid, _, _ = identity.partition(":")
    return pid.isdigit() and process_identity(int(pid)) == identity


def connect(timeout_s: float) -> docker.DockerClient:
    """A client for the daemon named by DOCKER_HOST (or the default socket), checked alive."""
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise DockerUnavailableError(
            "Cannot reach the Docker daemon",
            hint=f"{exc}; start it (`make setup` does on Debian) or set DOCKER_HOST",
        ) from exc
    return client


__all__ = [
    "DockerSandbox",
    "IsolationConfig",
    "Stage",
    "connect",
    "host_has_apparmor",
    "is_transient",
]
