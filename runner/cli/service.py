"""``serve``, ``broker``, ``up`` and ``sweep``: running the service; ``healthcheck`` probes it.

Owns: the long-running commands (a runner for a broker, the embedded broker, both
in one process), how they stop on SIGTERM/SIGINT, the health probe the runner
image's HEALTHCHECK runs, and ``sweep`` (this runner's leftover task containers, on
the engines the settings name).
What runs is built by :mod:`runner.cli.wiring`, :mod:`runner.service` and
:mod:`runner.broker_server`. Registered in :mod:`runner.cli.app` with
``main.add_command``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import click

from runner.cli import support
from runner.cli.support import EXIT_TASK_FAILED
from runner.settings import Settings

log = logging.getLogger("runner")


def _host_port(settings: Settings, host: str | None, port: int | None) -> Settings:
    overrides = {"broker_host": host, "broker_port": port}
    values = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=values) if values else settings


@contextlib.contextmanager
def _signals() -> Iterator[asyncio.Future[str]]:
    """SIGTERM and SIGINT as a future (the signal's name), the handlers installed at once:
    enter it before printing a ready line, so a signal sent right after that line drains
    the process instead of killing it with the default action."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def received(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, received, sig)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stop.cancel()


def _log_level(verbose: bool) -> None:
    logging.getLogger("runner").setLevel(logging.INFO)
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)


@click.command("serve")
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run tasks for a broker (n8n in external-runner mode, or `sandbox-runner broker`).

    Configured like n8n's Python runner: N8N_RUNNERS_TASK_BROKER_URI, N8N_RUNNERS_AUTH_TOKEN
    (or N8N_RUNNERS_GRANT_TOKEN), N8N_RUNNERS_MAX_CONCURRENCY, N8N_RUNNERS_TASK_TIMEOUT, ...
    """
    from runner.cli.wiring import task_pipeline
    from runner.metrics import CollectorRegistry, RunnerMetrics
    from runner.service import RunnerService

    settings = support.settings()
    _log_level(bool(ctx.find_root().params.get("verbose")))

    async def go() -> int:
        metrics = RunnerMetrics(CollectorRegistry())  # the sandbox counts its retries there
        async with task_pipeline(settings, support.progress, on_retry=metrics.retry) as pipeline:
            return await RunnerService(settings, pipeline, metrics=metrics).run()

    sys.exit(support.run(go))


def _say_store(location: str, is_durable: bool, is_shared: bool = False) -> None:
    if is_shared:
        support.say(f"task store: {location} (one queue shared by every broker on it)")
    elif is_durable:
        support.say(f"task store: {location} (queued tasks and results survive a restart)")
    else:
        support.say("task store: memory (tasks are lost when the broker stops)")


@click.command("broker")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 5679, n8n's broker port).")
@click.pass_context
def broker(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the embedded broker: runner endpoints and the HTTP API on one port."""
    from runner.broker_server.server import running_broker

    settings = _host_port(support.settings(), host, port)
    _log_level(bool(ctx.find_root().params.get("verbose")))

    async def go() -> int:
        async with running_broker(settings) as running:
            with _signals() as stop:
                support.say(f"broker listening on {running.url} (API docs: {running.url}/docs)")
                store = running.broker.store
                _say_store(store.location, store.is_durable, store.is_shared)
                signame = await stop
            support.say(f"{signame}: draining")
        return 0

    sys.exit(support.run(go))


@click.command("up")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 5679).")
@click.pass_context
def up(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Embedded broker and one runner in one process: submit tasks over HTTP."""
    from runner.broker_server.server import open_store, running_broker
    from runner.cli.wiring import task_pipeline
    from runner.metrics import CollectorRegistry, RunnerMetrics
    from runner.policy import load_policy
    from runner.service import RunnerService

    settings = _host_port(support.settings(), host, port)
    _log_level(bool(ctx.find_root().params.get("verbose")))

    async def go() -> int:
        registry = CollectorRegistry()  # one /metrics for the broker and its runner
        metrics = RunnerMetrics(registry)  # the sandbox counts its retries there
        # The policy, then the store: a bad bundle is reported before anything is
        # touched, and a store it cannot open (an unwritable directory, another broker
        # on the file) fails now, not after the runner's image, self-check and pool.
        load_policy(settings)
        with contextlib.closing(open_store(settings)) as store:
            async with (
                task_pipeline(settings, support.progress, on_retry=metrics.retry) as pipeline,
                running_broker(settings, registry=registry, store=store) as running,
            ):
                service = RunnerService(
                    settings,
                    pipeline,
                    broker_uri=running.url,
                    auth_token=running.auth_token,
                    handle_signals=False,
                    metrics=metrics,
                )
                serving = asyncio.create_task(service.run())
                url = running.url
                with _signals() as stop:
                    support.say(f"sandbox-runner is up: POST {url}/v1/tasks (API docs: {url}/docs)")
                    store = running.broker.store
                    _say_store(store.location, store.is_durable, store.is_shared)
                    either: list[asyncio.Future[Any]] = [serving, stop]
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                service.request_shutdown("Shutting down")
                return await serving

    sys.exit(support.run(go))


@click.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def sweep(as_json: bool) -> None:
    """Remove this runner's leftover task containers and any orphan past its deadline,
    on the engines SANDBOX_BACKEND names (auto: Docker's, and the OCI runtime's where
    it can run here)."""

    from runner.cli.wiring import load_isolation, make_oci_sandbox, oci_runtime
    from runner.errors import ConfigurationError
    from runner.sandbox.container import ContainerSandbox
    from runner.sandbox.docker import DockerSandbox, connect

    settings = support.settings()

    async def go() -> list[str]:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        isolation = load_isolation(settings)
        image = settings.image or "unused"  # a sweep makes no container
        sandboxes: list[ContainerSandbox[Any]] = []
        if settings.backend in ("auto", "docker"):
            sandboxes.append(
                DockerSandbox(
                    client, image=image, isolation=isolation, runner_id=settings.runner_id
                )
            )
        if settings.backend in ("auto", "oci"):
            # A runner on ``auto`` may have left containers on either engine (it takes
            # Docker when the OCI backend cannot run or fails its self-check).
            runtime = oci_runtime(settings)
            if not isinstance(runtime, str):
                sandboxes.append(
                    make_oci_sandbox(
                        settings, client, runtime, image=image, warm_pool=False, isolation=isolation
                    )
                )
            elif settings.backend == "oci":
                raise ConfigurationError("SANDBOX_BACKEND=oci cannot run here", hint=runtime)
        removed: list[str] = []
        try:
            for sandbox in sandboxes:
                removed += await sandbox.sweep()
        finally:
            for sandbox in sandboxes:
                await sandbox.aclose()
            await asyncio.to_thread(client.close)  # the OCI backend's is not its own
        return removed

    removed = support.run(go)
    if as_json:
        click.echo(json.dumps({"removed": removed}))
    elif removed:
        click.echo(f"removed {len(removed)} container(s): {' '.join(c[:12] for c in removed)}")
    else:
        click.echo("nothing to remove")


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 (a comparison)


def _answers(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http only)
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@click.command("healthcheck")
@click.option("--url", "urls", multiple=True, help="Probe this URL instead (repeatable).")
@click.option("--timeout", "timeout_s", type=float, default=3.0, show_default=True)
def healthcheck(urls: tuple[str, ...], timeout_s: float) -> None:
    """Exit 0 when this container's service answers its health endpoint, else 1.

    Probes the runner's health-check server (N8N_RUNNERS_HEALTH_CHECK_SERVER_*, when
    enabled) and the embedded broker's /healthz (`broker`, `up`); one answer is enough.
    The runner image's HEALTHCHECK runs it.
    """
    settings = support.settings()
    candidates = list(urls)
    if not candidates:
        if settings.health_check_server_enabled:
            host = _loopback(settings.health_check_server_host)
            candidates.append(f"http://{host}:{settings.health_check_server_port}/healthz")
        candidates.append(
            f"http://{_loopback(settings.broker_host)}:{settings.broker_port}/healthz"
        )
    for url in candidates:
        if _answers(url, timeout_s):
            click.echo(f"healthy: {url}")
            return
    click.echo(f"unhealthy: no answer from {', '.join(candidates)}", err=True)
    sys.exit(EXIT_TASK_FAILED)


__all__ = ["broker", "healthcheck", "serve", "sweep", "up"]
