"""The life of task containers, whatever engine makes them.

Owns :class:`ContainerSandbox`, what the Docker backend (:mod:`runner.sandbox.docker`)
and the OCI backend (:mod:`runner.sandbox.oci.sandbox`) share: one fresh container
per task, from the warm pool when a slot fits (its clock starts at the hand-over) or
started cold; the tenacity retry of **set-up** failures only (everything before the
task envelope is written to the container's stdin; once it is written the user's
code may be running, and nothing is retried); the host deadline; the one place where
what the host saw (exit code, OOM kill, who killed it, the capped output) and the
agent's envelope become an outcome (:func:`runner.sandbox.interpret.interpret`);
cancellation; the removal of every container off the task's path, retried until it
succeeds; the sweep of our leftovers by :func:`runner.sandbox.labels.is_leftover`;
the details each task's audit record gets; and, for a task the self-check asks about,
the limits the host applied to its container (:class:`~runner.sandbox.base.HostLimitsView`,
read by the engine while the container runs).

An engine subclass provides the blocking steps (each called in a worker thread, one
task's whole blocking life in one thread, so the event loop never waits on an
engine): start a container, exchange the envelope for its output, wait for its
exit, tell how it ended, kill it, remove it, list ours, classify its faults, and
(if it can) read the limits the host applied to a container.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from runner.errors import InfrastructureError
from runner.sandbox.base import (
    AppliedLimits,
    ExecutionResult,
    GuardConfig,
    Limits,
    Outcome,
    SandboxKernel,
    Stage,
    TaskError,
    TaskSpec,
)
from runner.sandbox.interpret import ProcessFacts, interpret, killed_before_report
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import is_leftover, ownership_labels, process_identity
from runner.sandbox.pool import Miss, PoolConfig, Slot, WarmPool
from runner.sandbox.stream import Output

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Past the task timeout the agent reports a timeout itself; the host deadline is
# the wall behind it (for an agent that cannot report) and kills the container.
HOST_GRACE_S = 5.0
# Room in a pool slot's deadline label for its own set-up (with retries) before it idles.
POOL_SETUP_SLACK_S = 30.0
KEY_MEMO_ENTRIES = 256


def allows_import(guards: GuardConfig, module: str) -> bool:
    """Whether ``guards`` let task code import ``module``: the analyzer's rule
    (``runner.analyzer.import_error``, which this package may not import): the top-level
    name in the standard-library or the external allowlist, or ``*`` there."""
    top = module.split(".", 1)[0]
    allowed = guards.stdlib_allow if top in sys.stdlib_module_names else guards.external_allow
    return "*" in allowed or top in allowed


@dataclass
class Container:
    """A created and started task container (cold, or a warm pool slot); engines
    subclass it with what they need to talk to it."""

    container_id: str
    started_at: float  # monotonic, when the engine's start returned
    attempts: int
    durations_ms: dict[str, float]
    # Monotonic twin of the container's deadline label: a pool slot may only serve a
    # task that ends (timeout + grace) before it, or the orphan sweep could take it.
    deadline_at: float = float("inf")


H = TypeVar("H", bound=Container)


@dataclass
class Run(Generic[H]):
    """Mutable state of one task's container while it lives (one worker thread)."""

    spec: TaskSpec
    limits: Limits
    container: H | None = None
    # When the task's clock starts: ``start`` for a cold container, the hand-over for
    # a warm one (a slot may have idled for minutes; that is not the task's time).
    started_at: float = 0.0
    warm: bool = False
    cold_reason: str | None = None
    pool_wait_s: float | None = None
    slot_age_s: float | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        """The host's deadline: the task's timeout from its clock's start, plus grace."""
        return self.started_at + self.limits.timeout_s + HOST_GRACE_S


@dataclass(frozen=True, slots=True)
class ExitFacts:
    """How a container that failed ended, as the host saw it (never the agent's word)."""

    oom_killed: bool = False
    # True: killed from outside the task (an operator, the engine); False: surely not
    # (so the task killed its own agent); None: cannot be told.
    outside_kill: bool | None = None


class ContainerSandbox(ABC, Generic[H]):
    """Runs each task in its own hardened container; see the module docstring."""

    #: The engine's name in audit records and logs ("docker", "oci").
    backend: ClassVar[str]
    #: What users read in an error when the engine itself fails ("The Docker daemon").
    engine_title: ClassVar[str]

    def __init__(
        self,
        *,
        isolation: IsolationConfig,
        runner_id: str,
        setup_attempts: int = 4,
        setup_backoff_max_s: float = 4.0,
        pool: PoolConfig | None = None,
        pool_limits: Limits | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._isolation = isolation
        self._runner_id = runner_id
        self._boot_id = uuid.uuid4().hex[:12]
        self._process = process_identity(os.getpid()) or f"{os.getpid()}:?"
        self._setup_attempts = setup_attempts
        self._setup_backoff_max_s = setup_backoff_max_s
        self._running: dict[str, str] = {}
        self._cancelled: set[str] = set()
        self._removals: set[asyncio.Future[None]] = set()
        # Containers whose removal failed (engine unreachable): retried before the next
        # container is made, by the sweep and on close, so an engine restart leaks none.
        self._unremoved: set[str] = set()
        self._keys: dict[tuple[Any, ...], str] = {}
        self._pool_limits = pool_limits or Limits()
        self._pool: WarmPool[H] | None = None
        if pool is not None and pool.is_enabled:
            self._pool = WarmPool(
                pool,
                create=self._create_slot,
                destroy=self._destroy_slot,
                is_alive=self._is_slot_alive,
            )
        self.retries_logged = 0
        # Told the cause of every set-up retry (the service counts them in its metrics).
        self.on_retry = on_retry
        # Tasks whose container's applied limits the host reads (the self-check's).
        self._observe: set[str] = set()
        self._observed: dict[str, AppliedLimits | None] = {}

    @property
    def boot_id(self) -> str:
        return self._boot_id

    @property
    def isolation(self) -> IsolationConfig:
        return self._isolation

    @property
    def pool(self) -> WarmPool[H] | None:
        return self._pool

    @property
    def kernel(self) -> SandboxKernel:
        """Which kernel answers a task's system calls."""
        return SandboxKernel.LINUX

    # -- public API ---------------------------------------------------------------

    async def warm_up(self, *, wait: bool = False) -> None:
        """Start filling the warm pool (no-op without one); ``wait`` until it is full."""
        if self._pool is None:
            return
        if not self._pool.is_started:
            # Known before the first hand-over, so a task's key can match the slots'.
            await asyncio.to_thread(self._prepare_quietly)
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
        run: Run[H] = Run(spec, limits)
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

    def observe_limits(self, task_id: str) -> None:
        """Have the engine read, on the host, the limits applied to ``task_id``'s
        container while it runs (:class:`~runner.sandbox.base.HostLimitsView`)."""
        self._observe.add(task_id)

    def observed_limits(self, task_id: str) -> AppliedLimits | None:
        """What the host read for ``task_id`` (once); None when this engine cannot."""
        self._observe.discard(task_id)
        return self._observed.pop(task_id, None)

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
        await asyncio.to_thread(self._close)

    # -- what an engine provides (blocking, in worker threads) ----------------------

    def _prepare(self) -> None:
        """Resolve what containers are made from (image id, root filesystem): called
        before every pool slot, and once before the pool starts."""

    def _prepare_quietly(self) -> None:
        try:
            self._prepare()
        except Exception as exc:  # the pool's own attempts report it
            log.debug("preparing the %s sandbox failed: %s", self.backend, exc)

    @abstractmethod
    def _start(
        self, labels: dict[str, str], limits: Limits, attempt: int, agent_args: tuple[str, ...] = ()
    ) -> H:
        """Create and start a container; on any failure nothing of it is left.
        ``agent_args`` go after the image's command (the agent's ``--preload``)."""

    @abstractmethod
    def _shape(self, limits: Limits) -> Any:
        """Everything that makes two containers alike (JSON-able): the pool's key."""

    @abstractmethod
    def _exchange(self, run: Run[H]) -> Output:
        """Write the task envelope, read the capped output until the result, EOF, a cap
        or ``run.deadline``; kill the container on a timeout or an overflow."""

    @abstractmethod
    def _wait_exit(self, container: H) -> int | None:
        """The container's exit code (128 + N for a signal), None if it cannot be told.
        Raises :class:`InfrastructureError` when the engine itself is gone."""

    @abstractmethod
    def _exit_facts(
        self, container: H, *, attribute_kill: bool, oom_possible: bool = False
    ) -> ExitFacts:
        """How a container that failed ended, from the engine's records: its OOM kill,
        and (``attribute_kill``: it died of a signal before the agent reported) whether
        the kill came from outside the task. ``oom_possible``: the agent read an OOM
        kill in its cgroup, or its task child died of SIGKILL (claims and hints: an
        engine may wait for its own record of an OOM kill, never take them for it)."""

    @abstractmethod
    def _kill(self, container_id: str) -> None:
        """SIGKILL the container (its PID 1: the whole PID namespace dies with it)."""

    @abstractmethod
    def _remove(self, container_id: str) -> None:
        """Remove the container and everything of it; raise when the engine cannot."""

    def _release(self, container: H) -> None:
        """Free what this process holds of a container (streams, descriptors)."""

    @abstractmethod
    def _list_ours(self) -> list[tuple[str, dict[str, str]]]:
        """Every container of this product on the engine, with its labels."""

    @abstractmethod
    def _is_slot_alive(self, container: H) -> bool:
        """Can an idle pool slot still take a task? No I/O."""

    @abstractmethod
    def _is_transient(self, exc: BaseException) -> bool:
        """Is a set-up failure worth another attempt?"""

    @abstractmethod
    def _retry_cause(self, exc: BaseException | None) -> str:
        """A retried set-up failure as a metrics label."""

    @abstractmethod
    def _setup_failed(self, exc: BaseException, what: str) -> InfrastructureError | None:
        """The error a set-up failure becomes once its attempts are spent; None for an
        exception that is no engine fault (a bug: it propagates as it is)."""

    def _image_ref(self) -> str | None:
        """The image every container is made from, for the result (None: not known)."""
        return None

    def _applied_limits(self, container: H) -> AppliedLimits | None:
        """The limits the host applied to a running container, read on the host
        (None: this engine has no such view)."""
        return None

    def _close(self) -> None:
        """Release the engine's client, if any."""

    # -- warm pool ----------------------------------------------------------------

    async def _hand_over(self, run: Run[H]) -> None:
        """Give the task a warm slot if one fits; its clock starts now, not at ``start``."""
        if self._pool is None:
            run.cold_reason = Miss.DISABLED.value
            return
        if not self._pool.is_started:
            await self.warm_up()
        limits = run.limits
        if not self._may_take_preloaded(run.spec):
            run.cold_reason = Miss.PRELOAD_NOT_ALLOWED.value
            return
        key = self._key_for(limits)

        def fits(slot: Slot[H]) -> bool:
            return time.monotonic() + limits.timeout_s + HOST_GRACE_S <= slot.resource.deadline_at

        taken = await self._pool.take(key, fits)
        run.pool_wait_s = taken.waited_s
        if taken.slot is None:
            run.cold_reason = taken.miss.value if taken.miss else None
            return
        run.container, run.warm = taken.slot.resource, True
        run.started_at = time.monotonic()
        run.slot_age_s = taken.slot.age_s(run.started_at)

    def _may_take_preloaded(self, spec: TaskSpec) -> bool:
        """May this task run in a slot whose agent imported the pool's ``preload``?

        Only when its own allowlist allows every one of them. A slot is made before
        its task is known, and a tenant's profile may narrow ``external_allow`` below
        the runner's; the child's purge of ``sys.modules`` would hide the module's
        name, but objects the agent's import left in memory would stay reachable from
        kept modules (the guards' known gap). So a task whose allowlist refuses a
        preloaded module starts cold: it never runs in a process that imported what
        it may not import. The agent checks the same before it forks (fail closed).
        """
        preload = self._pool.config.preload if self._pool is not None else ()
        return all(allows_import(spec.guards, name) for name in preload)

    def _create_slot(self) -> tuple[str, H]:
        """One pool slot, in a pool worker thread, with the same set-up retries as a task."""
        limits = self._pool_limits
        self._retry_removals()

        def attempt(number: int) -> tuple[str, H]:
            self._prepare()
            key = self._key_for(limits)
            labels = self._labels(limits, pool_key=key)
            container = self._start(labels, limits, number, self._slot_agent_args())
            return key, container

        return self._with_setup_retries(attempt, "start a warm pool container")

    def _slot_agent_args(self) -> tuple[str, ...]:
        """The agent's arguments in a pool slot: what to preload, if anything. Cold
        containers preload nothing: their agent gets its task at once, so a preload
        would only move a task's own import earlier, and cost every task that does
        not import it."""
        preload = self._pool.config.preload if self._pool is not None else ()
        return (f"--preload={','.join(preload)}",) if preload else ()

    def _destroy_slot(self, container: H) -> None:
        self._release(container)
        self._remove_quietly(container.container_id)

    def _key_for(self, limits: Limits) -> str:
        """Digest of everything that shapes a container (the engine's :meth:`_shape`).

        Labels are left out (they differ per container); the task's timeout and output
        cap are too: they travel in the task envelope and are enforced from hand-over,
        so a task with its own timeout still gets a warm slot.
        """
        shape = replace(limits, timeout_s=0.0, output_bytes=0)
        memo = (self._isolation, shape, self._memo_salt())
        key = self._keys.get(memo)
        if key is None:
            if len(self._keys) >= KEY_MEMO_ENTRIES:
                self._keys.clear()  # tasks with many different limits: start over
            payload = json.dumps(self._shape(shape), sort_keys=True, default=str)
            key = hashlib.sha256(payload.encode()).hexdigest()
            self._keys[memo] = key
        return key

    def _memo_salt(self) -> Any:
        """What else changes :meth:`_shape` over the sandbox's life (the image id)."""
        return None

    # -- one task, blocking, in a worker thread -----------------------------------

    def _run_blocking(self, run: Run[H]) -> ExecutionResult:
        begin = time.monotonic()
        self._retry_removals()
        if run.container is None:
            labels = self._labels(run.limits, task_id=run.spec.task_id)
            run.container = self._with_setup_retries(
                lambda number: self._start(labels, run.limits, number),
                "set up the task container",
            )
            run.started_at = run.container.started_at
            run.durations_ms.update(run.container.durations_ms)
        container = run.container
        self._running[run.spec.task_id] = container.container_id
        if run.spec.task_id in self._cancelled:
            self._kill_quietly(container.container_id)
        if run.spec.task_id in self._observe:
            # Before the task runs: its container exists, and nothing it does can
            # change what the host applied to it.
            self._observed[run.spec.task_id] = self._applied_limits(container)
        output = self._exchange(run)
        waited = time.monotonic()
        stdout = bytes(output.stdout)
        exit_code: int | None = None
        facts_seen = ExitFacts()
        max_print_calls = run.spec.guards.max_print_calls
        if output.early_result is not None:
            # A complete, valid, successful result: the exit code and the engine's
            # view add nothing, so neither ``wait`` nor its records are paid for.
            result = output.early_result
        else:
            try:
                exit_code = self._wait_exit(container)
            except InfrastructureError as exc:
                if not output.has_frame():
                    # The output ended because the engine went away (stopped or
                    # restarted), taking the container with it: an infrastructure
                    # fault, not the task's. The user's code may have run in part:
                    # never retried.
                    raise type(exc)(
                        f"{self.engine_title} went away while the task was running",
                        hint="the task's container was lost with it; the task was not "
                        "retried because its code may have run in part",
                        stage=Stage.RUN.value,
                    ) from exc
                exit_code = None  # the agent's complete frame still says how it ended
            facts = ProcessFacts(
                exit_code=exit_code,
                timed_out=output.timed_out,
                output_overflow=output.overflow,
                stderr_tail=output.stderr_tail.decode("utf-8", "replace"),
            )
            # Only a failure needs the engine's view; success skips it. The engine's OOM
            # record, not the agent's stats, decides a memory verdict; its record of
            # kills tells who ended a container that died unreported.
            result = interpret(stdout, facts, run.limits, max_print_calls=max_print_calls)
            if not (result.outcome.is_success or output.timed_out or output.overflow):
                facts_seen = self._exit_facts(
                    container,
                    attribute_kill=killed_before_report(stdout, exit_code),
                    # The agent's reading of its cgroup, or a task child dead of
                    # SIGKILL: an OOM kill looks so before the kernel has counted it.
                    oom_possible=result.details.get("agentOomKilled") is True
                    or result.details.get("childExitCode") == -signal.SIGKILL,
                )
                if facts_seen.oom_killed or facts_seen.outside_kill is not None:
                    facts = replace(
                        facts,
                        oom_killed=facts_seen.oom_killed,
                        outside_kill=facts_seen.outside_kill,
                    )
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
                "oomKilled": facts_seen.oom_killed,
                "killedFromOutside": facts_seen.outside_kill,
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
            image_id=self._image_ref(),
            durations_ms={**result.durations_ms, **run.durations_ms},
            details=details,
        )

    def _early_result(self, run: Run[H], output: Output) -> ExecutionResult | None:
        """The result, if the complete stdout frame read so far is a success."""
        early = interpret(
            bytes(output.stdout),
            ProcessFacts(exit_code=None),
            run.limits,
            max_print_calls=run.spec.guards.max_print_calls,
        )
        return early if early.outcome.is_success else None

    def _with_setup_retries(self, attempt: Callable[[int], _T], what: str) -> _T:
        retrying = Retrying(
            stop=stop_after_attempt(self._setup_attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=self._setup_backoff_max_s, jitter=0.2),
            retry=retry_if_exception(self._is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for retry in retrying:
                with retry:
                    return attempt(retry.retry_state.attempt_number)
        except InfrastructureError:
            raise
        except Exception as exc:
            error = self._setup_failed(exc, what)
            if error is None:
                raise
            raise error from exc
        raise AssertionError("unreachable: tenacity reraises the last failure")

    def _log_retry(self, state: RetryCallState) -> None:
        self.retries_logged += 1
        exc = state.outcome.exception() if state.outcome else None
        if self.on_retry is not None:
            self.on_retry(self._retry_cause(exc))
        log.warning(
            "container set-up failed (attempt %d of %d), retrying: %s: %s",
            state.attempt_number,
            self._setup_attempts,
            type(exc).__name__,
            exc,
        )

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

    # -- cleanup ------------------------------------------------------------------

    def _schedule_removal(self, container: H) -> None:
        """Remove off the critical path; ``aclose`` waits for every pending removal."""
        future = asyncio.ensure_future(asyncio.to_thread(self._destroy_slot, container))
        self._removals.add(future)
        future.add_done_callback(self._removals.discard)

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self._remove(container_id)
        except Exception as exc:
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
                return  # the engine is still unreachable: try again next time

    def _kill_quietly(self, container_id: str) -> None:
        try:
            self._kill(container_id)
        except Exception as exc:  # gone already, or the engine with it
            log.debug("could not kill container %s: %s", container_id[:12], exc)

    def _sweep_blocking(self) -> list[str]:
        now, removed = time.time(), []
        for container_id, labels in self._list_ours():
            if is_leftover(labels, runner_id=self._runner_id, boot_id=self._boot_id, now=now):
                self._remove_quietly(container_id)
                removed.append(container_id)
        if removed:
            log.info("swept %d leftover task container(s)", len(removed))
        return removed
