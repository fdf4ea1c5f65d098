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

Warm pool (:mod:`runner.sandbox.pool`): containers created, attached and started
ahead of time under the same configuration and labels, their agent blocked on
stdin. A task whose container would be identical (same key: image id + the whole
create request, labels aside) takes one; its clock (agent timeout and host
deadline) starts at the hand-over. Other tasks, or any task finding the pool
empty, start a cold container. A container serves one task, then is removed.

Per-container daemon cost, where it goes (bench/README.md has the numbers): the
slowest phase is ``start`` (shim, dockerd's network hook, runc), which the pool
takes off the task's path; removal runs off the critical path; ``inspect`` runs
only on failure; and a complete successful result frame ends the exchange at once,
without waiting for the daemon to notice the exit or calling ``wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

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

from runner.errors import DockerUnavailableError, ImageBuildError
from runner.sandbox.base import ExecutionResult, Limits, Outcome, Stage, TaskError, TaskSpec
from runner.sandbox.docker_errors import (
    DOCKER_FAULTS,
    docker_errors,
    is_transient,
    retry_cause,
    translate,
)
from runner.sandbox.envelope import encode_task
from runner.sandbox.interpret import ProcessFacts, interpret, killed_before_report
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import (
    LABEL_DEADLINE,
    LABEL_MANAGED,
    is_leftover,
    ownership_labels,
    process_identity,
)
from runner.sandbox.pool import Miss, PoolConfig, Slot, WarmPool
from runner.sandbox.stream import STDOUT, StreamDemux
from runner.sandbox.stream import Output as _Output

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Past the task timeout the agent reports a timeout itself; the host deadline is
# the wall behind it (for an agent that cannot report) and kills the container.
HOST_GRACE_S = 5.0
# Room in a pool slot's deadline label for its own set-up (with retries) before it idles.
POOL_SETUP_SLACK_S = 30.0
KEY_MEMO_ENTRIES = 256
# What a set-up attempt may fail with once its retries are spent (socket errors too).
SETUP_FAULTS: tuple[type[Exception], ...] = (*DOCKER_FAULTS, OSError)


@dataclass
class _Container:
    """A created, attached and started task container (cold, or a warm pool slot)."""

    container_id: str
    # docker-py hands back a file-like wrapper holding a reference to the socket;
    # both must be closed or the descriptor stays open.
    stream: Any
    sock: socket.socket
    started_at: float  # monotonic, when ``start`` returned
    attempts: int
    durations_ms: dict[str, float]
    # Monotonic twin of the container's deadline label: a pool slot may only serve a
    # task that ends (timeout + grace) before it, or the orphan sweep could take it.
    deadline_at: float = float("inf")


@dataclass
class _Run:
    """Mutable state of one task's container while it lives (one worker thread)."""

    spec: TaskSpec
    limits: Limits
    container: _Container | None = None
    # When the task's clock starts: ``start`` for a cold container, the hand-over for
    # a warm one (a slot may have idled for minutes; that is not the task's time).
    started_at: float = 0.0
    warm: bool = False
    cold_reason: str | None = None
    pool_wait_s: float | None = None
    slot_age_s: float | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)

    @property
    def container_id(self) -> str | None:
        return self.container.container_id if self.container else None


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


class DockerSandbox:
    """Runs each task in its own hardened container on one Docker host.

    With a warm pool (``pool.size > 0``), containers are created, attached and
    started ahead of time under the same configuration and labels; a task whose
    container would be identical takes one (hand-over), any other task, or one that
    finds the pool empty, starts a cold container. Either way the container serves
    one task and is destroyed.
    """

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
    ) -> None:
        self._client = client
        self._api = client.api
        self._image = image
        self._image_id: str | None = None
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
        # Containers whose removal failed (daemon unreachable): retried before the next
        # container is made, by the sweep and on close, so a daemon restart leaks none.
        self._unremoved: set[str] = set()
        self._keys: dict[tuple[Any, ...], str] = {}
        self._pool_limits = pool_limits or Limits()
        self._pool: WarmPool[_Container] | None = None
        if pool is not None and pool.is_enabled:
            self._pool = WarmPool(
                pool,
                create=self._create_slot,
                destroy=self._destroy_slot,
                is_alive=_is_slot_alive,
            )
        self.retries_logged = 0
        # Told the cause of every set-up retry (the service counts them in its metrics).
        self.on_retry: Callable[[str], None] | None = None

    @property
    def boot_id(self) -> str:
        return self._boot_id

    @property
    def isolation(self) -> IsolationConfig:
        return self._isolation

    @property
    def pool(self) -> WarmPool[_Container] | None:
        return self._pool

    # -- public API ---------------------------------------------------------------

    async def warm_up(self, *, wait: bool = False) -> None:
        """Start filling the warm pool (no-op without one); ``wait`` until it is full."""
        if self._pool is None:
            return
        if not self._pool.is_started:
            # Known before the first hand-over, so a task's key can match the slots'.
            with contextlib.suppress(*DOCKER_FAULTS):
                self._image_id = await asyncio.to_thread(self._resolve_image_id)
            self._pool.start()
        if wait:
            await self._pool.wait_filled()

    def set_pool_limits(self, limits: Limits) -> None:
        """Fill the pool for these limits from now on; idle slots of the old ones go."""
        if limits == self._pool_limits:
            return
        self._pool_limits = limits
        if self._pool is not None:
            self._pool.invalidate()

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        run = _Run(spec, limits)
        try:
            await self._hand_over(run)
            result = await asyncio.to_thread(self._run_blocking, run)
        finally:
            if run.container is not None:
                self._schedule_removal(run.container)
            self._running.pop(spec.task_id, None)
            self._cancelled.discard(spec.task_id)  # a cancel that found no container
        return result

    async def cancel(self, task_id: str) -> bool:
        """Kill the task's container; its ``run`` then ends with outcome ``cancelled``."""
        # Mark first, then look: the worker thread registers the container and then
        # checks the mark, so one of the two always sees the other.
        self._cancelled.add(task_id)
        container_id = self._running.get(task_id)
        if container_id is None:
            return False
        await asyncio.to_thread(self._kill_quietly, container_id)
        return True

    async def sweep(self) -> list[str]:
        """Remove our leftovers: earlier boots of this runner, and orphans past deadline."""
        await asyncio.to_thread(self._retry_removals)
        return await asyncio.to_thread(self._sweep_blocking)

    async def wait_removals(self) -> None:
        """Until every container removal scheduled so far has finished."""
        while self._removals:
            await asyncio.gather(*list(self._removals), return_exceptions=True)

    async def aclose(self) -> None:
        """Close the pool (every idle slot removed), wait for pending removals, so
        nothing outlives the sandbox."""
        if self._pool is not None:
            await self._pool.aclose()
        await self.wait_removals()
        await asyncio.to_thread(self._retry_removals)
        await asyncio.to_thread(self._client.close)

    # -- warm pool ----------------------------------------------------------------

    async def _hand_over(self, run: _Run) -> None:
        """Give the task a warm slot if one fits; its clock starts now, not at ``start``."""
        if self._pool is None:
            run.cold_reason = Miss.DISABLED.value
            return
        if not self._pool.is_started:
            await self.warm_up()
        limits = run.limits
        key = self._key_for(limits)

        def fits(slot: Slot[_Container]) -> bool:
            return time.monotonic() + limits.timeout_s + HOST_GRACE_S <= slot.resource.deadline_at

        taken = await self._pool.take(key, fits)
        run.pool_wait_s = taken.waited_s
        if taken.slot is None:
            run.cold_reason = taken.miss.value if taken.miss else None
            return
        run.container, run.warm = taken.slot.resource, True
        run.started_at = time.monotonic()
        run.slot_age_s = taken.slot.age_s(run.started_at)

    def _create_slot(self) -> tuple[str, _Container]:
        """One pool slot, in a pool worker thread, with the same set-up retries as a task."""
        limits = self._pool_limits
        self._retry_removals()

        def attempt(number: int) -> tuple[str, _Container]:
            self._image_id = self._resolve_image_id()
            key = self._key_for(limits)
            container = self._start_container(self._labels(limits, pool_key=key), limits, number)
            return key, container

        return self._with_setup_retries(attempt, "start a warm pool container")

    def _destroy_slot(self, container: _Container) -> None:
        _close_stream(container.stream, container.sock)
        self._remove_quietly(container.container_id)

    def _resolve_image_id(self) -> str:
        try:
            # The stub leaves this one untyped; it returns the daemon's JSON answer.
            image = self._api.inspect_image(self._image)  # type: ignore[no-untyped-call]
            return str(image["Id"])
        except docker.errors.ImageNotFound:
            self._build_image_once()
            raise

    def _key_for(self, limits: Limits) -> str:
        """Digest of everything that shapes a container: image id and its create request.

        Labels are left out (they differ per container); the task's timeout and output
        cap are too: they travel in the task envelope and are enforced from hand-over,
        so a task with its own timeout still gets a warm slot.
        """
        shape = replace(limits, timeout_s=0.0, output_bytes=0)
        memo = (self._image, self._image_id, self._isolation, shape)
        key = self._keys.get(memo)
        if key is None:
            if len(self._keys) >= KEY_MEMO_ENTRIES:
                self._keys.clear()  # tasks with many different limits: start over
            config = self._container_config(shape, labels={})
            payload = json.dumps([self._image_id, config], sort_keys=True, default=str)
            key = hashlib.sha256(payload.encode()).hexdigest()
            self._keys[memo] = key
        return key

    # -- one task, blocking, in a worker thread -----------------------------------

    def _run_blocking(self, run: _Run) -> ExecutionResult:
        begin = time.monotonic()
        self._retry_removals()
        if run.container is None:
            labels = self._labels(run.limits, task_id=run.spec.task_id)
            run.container = self._with_setup_retries(
                lambda number: self._start_container(labels, run.limits, number),
                "set up the task container",
            )
            run.started_at = run.container.started_at
            run.durations_ms.update(run.container.durations_ms)
        container = run.container
        self._running[run.spec.task_id] = container.container_id
        if run.spec.task_id in self._cancelled:
            self._kill_quietly(container.container_id)
        output = self._exchange(run)
        waited = time.monotonic()
        stdout = bytes(output.stdout)
        exit_code: int | None = None
        oom_killed = False
        outside_kill: bool | None = None
        max_print_calls = run.spec.guards.max_print_calls
        if output.early_result is not None:
            # A complete, valid, successful result: the exit code and the daemon's
            # view add nothing, so neither ``wait`` nor ``inspect`` is paid for.
            result = output.early_result
        else:
            try:
                exit_code = self._wait_exit(container.container_id)
            except DockerUnavailableError:
                if output.has_frame():
                    exit_code = None  # the agent's complete frame still says how it ended
                else:
                    # The stream ended because the daemon went away (stopped or restarted),
                    # taking the container with it: an infrastructure fault, not the
                    # task's. The user's code may have run in part: never retried.
                    raise DockerUnavailableError(
                        "The Docker daemon went away while the task was running",
                        hint="the task's container was lost with it; the task was not "
                        "retried because its code may have run in part",
                        stage=Stage.RUN.value,
                    ) from None
            facts_needed = output.timed_out or output.overflow
            facts = ProcessFacts(
                exit_code=exit_code,
                timed_out=output.timed_out,
                output_overflow=output.overflow,
                stderr_tail=output.stderr_tail.decode("utf-8", "replace"),
            )
            result = interpret(stdout, facts, run.limits, max_print_calls=max_print_calls)
            if not result.outcome.is_success and not facts_needed:
                # Only a failure needs the daemon's view; success skips the calls. The
                # daemon's OOM record, not the agent's stats, decides a memory verdict;
                # its record of kills tells who ended a container that died unreported.
                exit_state = self._exit_state(container.container_id)
                oom_killed = exit_state.oom_killed
                if killed_before_report(stdout, exit_code) and not oom_killed:
                    outside_kill = self._outside_kill(container.container_id, exit_state)
                if oom_killed or outside_kill is not None:
                    facts = replace(facts, oom_killed=oom_killed, outside_kill=outside_kill)
                    result = interpret(stdout, facts, run.limits, max_print_calls=max_print_calls)
        if run.spec.task_id in self._cancelled:
            self._cancelled.discard(run.spec.task_id)
            result = ExecutionResult(
                outcome=Outcome.CANCELLED,
                error=TaskError(Outcome.CANCELLED, "Task was cancelled", has_description=False),
                prints=result.prints,
            )
        end = time.monotonic()
        if run.pool_wait_s is not None:
            run.durations_ms["poolWait"] = run.pool_wait_s * 1000
        run.durations_ms["run"] = (waited - run.started_at) * 1000
        run.durations_ms["wait"] = (end - waited) * 1000
        run.durations_ms["sandboxTotal"] = (end - begin) * 1000
        details = dict(result.details)
        details.update(
            {
                "exitCode": exit_code,
                "exitWaited": output.early_result is None,
                "oomKilled": oom_killed,
                "killedFromOutside": outside_kill,
                "setupAttempts": container.attempts,
                "stdoutBytes": len(stdout),
                "stderrBytes": output.stderr_bytes,
                "containerStart": "warm" if run.warm else "cold",
            }
        )
        if run.warm:
            details["poolSlotAgeMs"] = round((run.slot_age_s or 0.0) * 1000, 3)
        else:
            details["coldReason"] = run.cold_reason
        return replace(
            result,
            container_id=container.container_id,
            image_id=self._image,
            durations_ms={**result.durations_ms, **run.durations_ms},
            details=details,
        )

    def _with_setup_retries(self, attempt: Callable[[int], _T], what: str) -> _T:
        retrying = Retrying(
            stop=stop_after_attempt(self._setup_attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=self._setup_backoff_max_s, jitter=0.2),
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for retry in retrying:
                with retry:
                    return attempt(retry.retry_state.attempt_number)
        except docker.errors.ImageNotFound as exc:
            raise ImageBuildError(
                f"Task image {self._image} is missing", hint="run `sandbox-runner image build`"
            ) from exc
        except SETUP_FAULTS as exc:
            raise translate(exc, what) from exc
        raise AssertionError("unreachable: tenacity reraises the last failure")

    def _log_retry(self, state: RetryCallState) -> None:
        self.retries_logged += 1
        exc = state.outcome.exception() if state.outcome else None
        if self.on_retry is not None:
            self.on_retry(retry_cause(exc))
        log.warning(
            "container set-up failed (attempt %d of %d), retrying: %s: %s",
            state.attempt_number,
            self._setup_attempts,
            type(exc).__name__,
            exc,
        )

    def _start_container(self, labels: dict[str, str], limits: Limits, attempt: int) -> _Container:
        """Create, attach, start. On any failure the half-made container is removed."""
        t0 = time.monotonic()
        deadline_at = t0 + float(labels[LABEL_DEADLINE]) - time.time()
        try:
            config = self._container_config(limits, labels)
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
        return _Container(
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

    def _container_config(self, limits: Limits, labels: dict[str, str]) -> dict[str, Any]:
        config: dict[str, Any] = self._api.create_container_config(
            image=self._image,
            command=[],  # the image's entrypoint (tini + agent) takes no arguments
            user=self._isolation.user,
            stdin_open=True,
            tty=False,
            # network_mode "none" in the host config is the isolation; the legacy
            # NetworkDisabled flag would also leave /etc/hosts without localhost.
            hostname="sandbox",
            labels=labels,
            host_config=self._host_config(limits),
        )
        # Close the container's stdin when our side of the attach stream closes.
        config["StdinOnce"] = True
        return config

    def _build_image_once(self) -> None:
        with self._image_lock:
            if self._image_built or self._ensure_image is None:
                return
            self._image_built = True
            log.warning("task image %s is missing; building it once", self._image)
            self._image = self._ensure_image()

    def _labels(
        self, limits: Limits, *, task_id: str | None = None, pool_key: str | None = None
    ) -> dict[str, str]:
        now = time.time()
        if pool_key is None:
            deadline = now + limits.timeout_s + HOST_GRACE_S
        else:
            # A slot may idle up to max_idle_s, then serve one task: the orphan sweep
            # must leave it alone that long, and reap it after a dead runner.
            max_idle_s = self._pool.config.max_idle_s if self._pool else 0.0
            deadline = now + POOL_SETUP_SLACK_S + max_idle_s + limits.timeout_s + HOST_GRACE_S
        return ownership_labels(
            runner_id=self._runner_id,
            boot_id=self._boot_id,
            process=self._process,
            policy_sha256=self._isolation.seccomp_sha256,
            deadline=deadline,
            now=now,
            task_id=task_id,
            pool_key=pool_key,
        )

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
            nano_cpus=limits.nano_cpus,  # rounded, never 0 (0 would mean unlimited)
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
        """Write the task envelope, then read stdout/stderr until the result, EOF, the cap
        or the deadline.

        A complete stdout frame that decodes to a success ends the exchange at once:
        the agent writes its one frame last, so nothing after it can change the
        outcome, and the ~30 ms the daemon takes to notice the exit (plus ``wait``)
        stay off the task's latency. Any other frame is read on to EOF, so the
        stderr tail (crash reports) and a stray second frame are still seen.
        """
        assert run.container is not None
        container = run.container
        sock, output = container.sock, _Output.for_output_cap(run.limits.output_bytes)
        demux = StreamDemux()
        deadline = run.started_at + run.limits.timeout_s + HOST_GRACE_S
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
                    facts = ProcessFacts(exit_code=None)
                    early = interpret(
                        bytes(output.stdout),
                        facts,
                        run.limits,
                        max_print_calls=run.spec.guards.max_print_calls,
                    )
                    if early.outcome.is_success:
                        output.early_result = early
                    else:
                        pump(sock, demux, output, deadline, until_frame=False)
        finally:
            _close_stream(container.stream, sock)
        if output.timed_out or output.overflow:
            self._kill_quietly(container.container_id)
        return output

    def _wait_exit(self, container_id: str) -> int | None:
        """The container's exit code, or None when the daemon cannot say.

        Raises :class:`DockerUnavailableError` when the daemon cannot be reached at all
        (its socket is gone or refuses us): the caller decides what that means.
        """
        try:
            status = self._api.wait(container_id, timeout=30)
            return int(status.get("StatusCode", -1))
        except requests.exceptions.ConnectionError as exc:
            log.warning("could not wait for container %s: %s", container_id[:12], exc)
            raise DockerUnavailableError("Docker daemon unreachable", hint=str(exc)) from exc
        except DOCKER_FAULTS as exc:
            log.warning("could not wait for container %s: %s", container_id[:12], exc)
            return None

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

    # -- cleanup ------------------------------------------------------------------

    def _schedule_removal(self, container: _Container) -> None:
        """Remove off the critical path; ``aclose`` waits for every pending removal."""
        future = asyncio.ensure_future(asyncio.to_thread(self._destroy_slot, container))
        self._removals.add(future)
        future.add_done_callback(self._removals.discard)

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self._api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except DOCKER_FAULTS as exc:
            # Retried before the next container is made, on sweep and on close; the
            # next runner's start-up sweep is the backstop if this process dies first.
            self._unremoved.add(container_id)
            log.warning("could not remove container %s (will retry): %s", container_id[:12], exc)
            return
        self._unremoved.discard(container_id)

    def _retry_removals(self) -> None:
        """One more attempt at every removal that failed; stops at the first failure."""
        for container_id in list(self._unremoved):
            self._remove_quietly(container_id)
            if container_id in self._unremoved:
                return  # the daemon is still unreachable: try again next time

    def _kill_quietly(self, container_id: str) -> None:
        with contextlib.suppress(*DOCKER_FAULTS):
            self._api.kill(container_id)

    def _sweep_blocking(self) -> list[str]:
        with docker_errors("list containers"):
            containers = self._api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
        now, removed = time.time(), []
        for container in containers:
            labels = container.get("Labels") or {}
            if is_leftover(labels, runner_id=self._runner_id, boot_id=self._boot_id, now=now):
                self._remove_quietly(container["Id"])
                removed.append(container["Id"])
        if removed:
            log.info("swept %d leftover task container(s)", len(removed))
        return removed


def _close_stream(stream: Any, sock: socket.socket) -> None:
    for closable in (stream, sock):
        with contextlib.suppress(OSError, AttributeError):
            closable.close()


def _is_slot_alive(container: _Container) -> bool:
    """An idle slot's agent is silent until it gets a task: anything readable on its
    stream (output, or EOF because the container died) makes it unusable. No I/O."""
    try:
        readable, _, _ = select.select([container.sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def pump(
    sock: socket.socket,
    demux: StreamDemux,
    output: _Output,
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
