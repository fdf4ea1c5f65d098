"""``sandbox-runner serve``: the runner service that n8n's broker hands tasks to.

Owns the wiring between the protocol machine, the broker connection and the task
pipeline: starting a task when its settings arrive (at most ``max_concurrency`` at
once, which the machine's offers guarantee), cancelling one, reporting exactly one
completion per accepted task, one structured audit line per finished task, the
health endpoint, idle auto-shutdown, and the graceful drain on SIGTERM/SIGINT:
stop offering, let running tasks finish within the graceful timeout, then kill the
rest (their containers), deliver what can be delivered, close; exit 0, or 1 when
tasks had to be killed. It knows no wire strings (the machine does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal
import string
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from runner.broker import BrokerClient, BrokerEndpoint
from runner.errors import LimitAboveCeiling, ProfileUnavailable, RunnerError
from runner.logs import AUDIT_LOGGER, current_task_id
from runner.metrics import CONTENT_TYPE, CollectorRegistry, RunnerMetrics, exposition
from runner.pipeline import (
    AuditRecord,
    ServiceFacts,
    ServiceOutcome,
    TaskPipeline,
    TaskProfile,
    TaskReport,
    TaskRequest,
    check_requested_limits,
    per_task,
)
from runner.protocol.machine import (
    CancelTask,
    Completion,
    IdleTimeout,
    RunnerProtocol,
    StartTask,
    Undeliverable,
)
from runner.protocol.settings import TaskLimitsRequest, TaskSettings
from runner.sandbox.base import MIB, MINIMUM_LIMITS, ErrorCode, Limits, Stage
from runner.settings import Settings, env_name

log = logging.getLogger(__name__)
audit_log = logging.getLogger(AUDIT_LOGGER)

CLIENT_STOP_TIMEOUT_S = 5.0
RUNNER_ID_ALPHABET = string.ascii_letters + string.digits
HEALTH_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"
HEALTH_READ_TIMEOUT_S = 2.0


def _metrics_response(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def new_runner_id() -> str:
    """22 characters from [A-Za-z0-9], as n8n's runner ids (CSPRNG)."""
    return "".join(secrets.choice(RUNNER_ID_ALPHABET) for _ in range(22))


# The runner's limit is its setting or, unset, the bundle's default (not the bundle's
# ceiling): a refusal says which variable sets it.
_SETTING_OF_LIMIT = {"timeoutSeconds": "task_timeout_s", "memoryMb": "memory_mb", "cpus": "cpus"}


def _runner_refusal(name: str, value: float, ceiling: float) -> str:
    """The runner's words for a per-task limit above its own (the broker's differ)."""
    return (
        f"{name} {value:g} exceeds {ceiling:g}, this runner's per-task limit "
        f"({env_name(_SETTING_OF_LIMIT[name])}, or the policy bundle's default when unset)"
    )


def _tenant_refusal(profile: TaskProfile) -> Callable[[str, float, float], str]:
    """The words for a limit above a tenant's: its profile's, when the profile sets it."""

    def refusal(name: str, value: float, ceiling: float) -> str:
        if name not in profile.sets:
            return _runner_refusal(name, value, ceiling)
        return (
            f"{name} {value:g} exceeds {ceiling:g}, this runner's per-task limit for tenant "
            f"{profile.tenant} ({profile.source})"
        )

    return refusal


def completion_of(report: TaskReport) -> Completion:
    """A pipeline report as the machine's completion (with our report extension)."""
    extension = {
        "code": report.error.code.value if report.error else None,
        "stage": report.error.stage.value if report.error else None,
        "audit": report.audit,
    }
    if report.error is None:
        return Completion(result=report.result, prints=report.prints, report=extension)
    return Completion(
        error_message=report.error.message,
        error_description=report.error.description if report.error.has_description else None,
        prints=report.prints,
        report=extension,
    )


class RunnerService:
    def __init__(
        self,
        settings: Settings,
        pipeline: TaskPipeline,
        *,
        broker_uri: str | None = None,
        auth_token: str | None = None,
        handle_signals: bool = True,
        metrics: RunnerMetrics | None = None,
    ) -> None:
        """``metrics``: where this runner counts (default: its own, on a registry of its
        own). Its pipeline's sandbox counts its set-up retries there when it was made
        with ``on_retry=metrics.retry`` (:func:`runner.cli.wiring.task_pipeline`)."""
        self.settings = settings
        self.pipeline = pipeline
        self.runner_id = new_runner_id()
        # Served at /metrics on the health-check server (and by `up`'s broker).
        self.metrics = metrics if metrics is not None else RunnerMetrics(CollectorRegistry())
        self.machine = RunnerProtocol(
            max_concurrency=settings.max_concurrency,
            max_payload=settings.max_payload,
            clock=time.monotonic,
            new_id=new_runner_id,
            jitter_ms=lambda: secrets.randbelow(501),
            auto_shutdown_s=settings.auto_shutdown_timeout_s,
            undelivered_ttl_s=settings.undelivered_ttl_s,
        )
        endpoint = BrokerEndpoint(
            uri=broker_uri or settings.task_broker_uri,
            runner_id=self.runner_id,
            grant_token=settings.grant_token.get_secret_value() if settings.grant_token else None,
            auth_token=auth_token
            or (settings.auth_token.get_secret_value() if settings.auth_token else None),
            max_payload=settings.max_payload,
            backoff_max_s=settings.reconnect_backoff_max_s,
        )
        self.client = BrokerClient(
            endpoint, self.machine, on_input=self._handle_events, on_retry=self.metrics.retry
        )
        self._wire_metrics()
        self._handle_signals = handle_signals
        self._running: dict[str, asyncio.Task[None]] = {}
        self._helpers: set[asyncio.Task[Any]] = set()
        self._accepted_at: dict[str, float] = {}
        self._shutdown = asyncio.Event()
        self._task_started = asyncio.Event()
        self._client_stop = asyncio.Event()
        self.health_port: int | None = None

    def _wire_metrics(self) -> None:
        context = self.pipeline.context
        seccomp = context.isolation.get("seccomp") if isinstance(context.isolation, dict) else None
        self.metrics.set_policy(
            policy_sha256=context.policy_sha256,
            seccomp_sha256=str(seccomp.get("sha256", "")) if isinstance(seccomp, dict) else "",
            image=context.image,
            runner_id=context.runner_id,
        )
        self.metrics.running.set_function(lambda: float(len(self._running)))
        self.metrics.track_offers(lambda: self.machine.open_offer_count)

    # -- lifecycle ----------------------------------------------------------------------

    def request_shutdown(self, reason: str = "requested") -> None:
        if not self._shutdown.is_set():
            log.info("%s, starting shutdown...", reason)
            self._shutdown.set()

    async def run(self) -> int:
        """Serve until shutdown; return the exit code (0 clean, 1 tasks had to be killed)."""
        loop = asyncio.get_running_loop()
        if self._handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(
                    sig, self.request_shutdown, f"Received {signal.Signals(sig).name} signal"
                )
        log.info(
            "Runner %s starting (max concurrency %d, broker %s)",
            self.runner_id,
            self.settings.max_concurrency,
            self.client.url,
        )
        health = await self._start_health_server()
        client = asyncio.create_task(self.client.run(self._client_stop))
        shutdown = asyncio.create_task(self._shutdown.wait())
        try:
            await asyncio.wait([client, shutdown], return_when=asyncio.FIRST_COMPLETED)
            if client.done() and client.exception() is not None:
                log.error("Broker connection failed: %s", client.exception())
            return await self._drain_and_stop(client)
        finally:
            shutdown.cancel()
            if health is not None:
                health.close()
                await health.wait_closed()
            if self._handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if client.done() and not client.cancelled() and client.exception() is not None:
                raise client.exception()  # type: ignore[misc]

    async def _drain_and_stop(self, client: asyncio.Task[None]) -> int:
        self.machine.begin_shutdown()
        self.client.flush_soon()
        forced = False
        pending = await self._wait_for_accepted_tasks(self.settings.graceful_shutdown_timeout_s)
        if pending:
            forced = True
            log.warning("Shutdown timed out, killing %d running task(s)", len(pending))
            for task_id in list(self._running):
                await self._cancel(task_id)
            await asyncio.wait(pending, timeout=10)
        await self.client.flush_now()
        for task_id in self.machine.undelivered_task_ids():
            log.error(
                "task %s finished but its result could not be delivered",
                task_id,
                extra={"taskId": task_id},
            )
        self._client_stop.set()
        try:
            await asyncio.wait_for(client, timeout=CLIENT_STOP_TIMEOUT_S)
        except TimeoutError:
            # A broker that does not answer our close frame must not hold the exit.
            log.warning("The broker did not acknowledge the close; dropping the connection")
        except (asyncio.CancelledError, RunnerError):
            pass
        if self._helpers:
            await asyncio.gather(*self._helpers, return_exceptions=True)
        log.info("Runner stopped")
        return 1 if forced else 0

    async def _wait_for_accepted_tasks(self, timeout_s: float) -> set[asyncio.Task[None]]:
        """Until every task this runner accepted has finished, or the timeout: also those
        whose settings arrive during the drain (they start then). What is still running
        at the deadline is returned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._running or self.machine.running_count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._task_started.clear()
            started = asyncio.ensure_future(self._task_started.wait())
            await asyncio.wait(
                [*self._running.values(), started],
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            started.cancel()
        return set(self._running.values())

    async def _start_health_server(self) -> asyncio.Server | None:
        if not self.settings.health_check_server_enabled:
            return None

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Any request is a health check (n8n's behaviour), except GET /metrics.
            try:
                line = await asyncio.wait_for(reader.readline(), HEALTH_READ_TIMEOUT_S)
            except (TimeoutError, ConnectionError, ValueError):
                line = b""
            parts = line.split()
            if len(parts) >= 2 and parts[1].split(b"?")[0] == b"/metrics":
                writer.write(_metrics_response(exposition(self.metrics.registry)))
            else:
                writer.write(HEALTH_RESPONSE)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        host, port = self.settings.health_check_server_host, self.settings.health_check_server_port
        try:
            server = await asyncio.start_server(answer, host, port)
        except OSError as exc:
            raise RunnerError(f"Port {port} is already in use", hint=str(exc)) from exc
        self.health_port = server.sockets[0].getsockname()[1]
        log.info("Health check server listening on %s, port %d", host, self.health_port)
        return server

    # -- events from the machine ------------------------------------------------------

    def _handle_events(self) -> None:
        for event in self.machine.events():
            match event:
                case StartTask(task_id=task_id, settings=settings, accepted_at=accepted_at):
                    # The machine's clock is time.monotonic (see __init__).
                    self._accepted_at[task_id] = (
                        accepted_at if accepted_at is not None else time.monotonic()
                    )
                    task = asyncio.create_task(self._execute(task_id, settings))
                    self._running[task_id] = task
                    task.add_done_callback(functools.partial(self._forget, task_id))
                    self._task_started.set()
                case CancelTask(task_id=task_id, reason=reason):
                    log.info("Cancelling task %s: %s", task_id, reason, extra={"taskId": task_id})
                    self._spawn(self._cancel(task_id))
                case IdleTimeout():
                    self.request_shutdown("Reached idle timeout")
                case Undeliverable(task_id=task_id, reason=reason):
                    log.error(
                        "task %s result is undeliverable: %s",
                        task_id,
                        reason,
                        extra={"taskId": task_id},
                    )

    def _forget(self, task_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(task_id, None)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    async def _cancel(self, task_id: str) -> None:
        await self.pipeline.cancel(task_id)

    # -- running a task -----------------------------------------------------------------

    async def _execute(self, task_id: str, settings: TaskSettings) -> None:
        started = time.monotonic()
        current_task_id.set(task_id)  # this asyncio task's own context: every log line
        accepted = self._accepted_at.get(task_id, started)
        try:
            # The tenant's profile comes from this runner's own bundle: the broker only
            # names the tenant (n8n never does: then the defaults apply).
            profile = self.pipeline.profile_for(settings.tenant)
            if profile is not None and profile.refusal is not None:
                raise ProfileUnavailable(profile.refusal)
            limits = self.limits_for(settings.limits, profile)
            report = await self.pipeline.run(
                TaskRequest(
                    code=settings.code,
                    items=settings.items,
                    mode=settings.node_mode,
                    continue_on_fail=settings.continue_on_fail,
                    query=settings.query,
                    task_id=task_id,
                    limits=limits,
                    profile=profile,
                )
            )
            completion = completion_of(report)
            self._audit(task_id, settings, report, started)
            self.metrics.task_finished(
                outcome=report.outcome.value,
                error_code=report.error.code.value if report.error else None,
                audit=report.audit,
                queue_wait_s=started - accepted,
            )
        except (LimitAboveCeiling, ProfileUnavailable) as exc:
            outcome = ServiceOutcome.REJECTED
            if isinstance(exc, LimitAboveCeiling):
                code = ErrorCode.LIMIT_ABOVE_CEILING
                completion = Completion(error_message=str(exc), error_description="")
            else:
                # With our code, so that the broker's document says why (not task_error).
                code = ErrorCode.PROFILE_UNAVAILABLE
                completion = Completion(
                    error_message=str(exc),
                    error_description="",
                    report={"code": code.value, "stage": Stage.SETUP.value, "audit": None},
                )
            self.metrics.task_finished(
                outcome=outcome, error_code=code, audit=None, queue_wait_s=None
            )
            self._audit_failure(task_id, settings, started, outcome, code)
        except RunnerError as exc:
            log.error("task %s failed in the runner: %s", task_id, exc)
            self.metrics.task_finished(
                outcome=ServiceOutcome.RUNNER_ERROR,
                error_code=exc.code,
                audit=None,
                queue_wait_s=None,
            )
            completion = Completion(
                error_message=f"Task could not be run: {exc.message}",
                error_description=exc.hint or "",
                report={"code": exc.code, "stage": exc.stage, "audit": None},
            )
            self._audit_failure(
                task_id, settings, started, ServiceOutcome.RUNNER_ERROR, exc.code, exc.stage
            )
        except Exception as exc:  # never leave a task stuck on a bug of ours
            log.exception("task %s: internal error", task_id)
            outcome, code = ServiceOutcome.INTERNAL_ERROR, ErrorCode.INTERNAL_ERROR
            self.metrics.task_finished(
                outcome=outcome, error_code=code, audit=None, queue_wait_s=None
            )
            completion = Completion(
                error_message=f"Internal error of the runner: {type(exc).__name__}",
                error_description="",
            )
            self._audit_failure(task_id, settings, started, outcome, code)
        finally:
            self._accepted_at.pop(task_id, None)
        self.machine.finish_task(task_id, completion)
        self.client.flush_soon()
        log.info(
            'Completed task %s in %.0fms for node "%s" (%s) in workflow "%s" (%s)',
            task_id,
            (time.monotonic() - started) * 1000,
            settings.node_name,
            settings.node_id,
            settings.workflow_name,
            settings.workflow_id,
        )

    def limits_for(
        self, requested: TaskLimitsRequest | None, profile: TaskProfile | None = None
    ) -> Limits | None:
        """Per-task limits asked for by the broker, never above this runner's own (for a
        tenant with a profile: the profile's, which the bundle's ceilings bound)."""
        if requested is None:
            return None
        base = profile.limits if profile is not None else self.pipeline.limits
        check_requested_limits(
            per_task(requested.timeout_seconds, requested.memory_mb, requested.cpus),
            per_task(base.timeout_s, base.memory_bytes // MIB, base.cpus),
            _runner_refusal if profile is None else _tenant_refusal(profile),
            floors=per_task(
                MINIMUM_LIMITS.timeout_s, MINIMUM_LIMITS.memory_bytes // MIB, MINIMUM_LIMITS.cpus
            ),
        )
        changes: dict[str, Any] = {}
        if requested.timeout_seconds is not None:
            changes["timeout_s"] = requested.timeout_seconds
        if requested.memory_mb is not None:
            changes["memory_bytes"] = requested.memory_mb * MIB
        if requested.cpus is not None:
            changes["cpus"] = requested.cpus
        return replace(base, **changes)

    def _audit_failure(
        self,
        task_id: str,
        settings: TaskSettings,
        started: float,
        outcome: ServiceOutcome,
        code: str,
        stage: str | None = Stage.SETUP,
    ) -> None:
        """The audit line of a task that never reached a sandbox report (one per task)."""
        record = AuditRecord(
            task_id=task_id,
            runner_id=self.settings.runner_id,
            outcome=outcome,
            error_code=code,
            stage=stage,
            container_id=None,
            durations_ms={"total": (time.monotonic() - started) * 1000},
            service=self._service_facts(settings),
        )
        audit_log.info(record.log_line())

    def _audit(
        self, task_id: str, settings: TaskSettings, report: TaskReport, started: float
    ) -> None:
        accepted = self._accepted_at.pop(task_id, started)
        facts = self._service_facts(settings, queue_ms=(started - accepted) * 1000)
        audit_log.info(report.record.with_service(facts).log_line())

    def _service_facts(self, settings: TaskSettings, queue_ms: float | None = None) -> ServiceFacts:
        profile = self.pipeline.profile_for(settings.tenant)
        return ServiceFacts(
            broker_runner_id=self.runner_id,
            workflow_id=settings.workflow_id,
            workflow_name=settings.workflow_name,
            node_id=settings.node_id,
            node_name=settings.node_name,
            queue_ms=queue_ms,
            tenant=profile.audit if profile is not None else None,
        )
