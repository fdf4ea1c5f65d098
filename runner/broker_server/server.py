"""Run the embedded broker: uvicorn serving the app, our own signal-driven drain.

uvicorn would close runner sockets on SIGTERM before anything could drain, so the
server is started on a socket we bind ourselves (a busy port is a clear error, not
an exit from inside uvicorn) and stopped by us: drain (``broker:drain`` to every
runner, wait a bounded time for running tasks), close runner sockets with 1001,
then stop serving, and stop the schema workers (callers' schemas are checked in
worker processes: :mod:`runner.broker_server.schema_pool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import uvicorn

from runner.broker_server.app import ApiConfig, LimitSource, TenantCeilings, create_app
from runner.broker_server.cluster import ClusterLink
from runner.broker_server.core import Broker, BrokerConfig
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.redis_store import RedisStore
from runner.broker_server.schema_pool import SchemaPool
from runner.broker_server.sqlite_store import SqliteStore
from runner.broker_server.store import (
    REDIS,
    SQLITE,
    SQLITE_FILE_NAME,
    MemoryStore,
    SharedStore,
    TaskStore,
    parse_store,
)
from runner.broker_server.submission import TaskLimits
from runner.broker_server.tokens import GrantTokens
from runner.errors import ConfigurationError, InfrastructureError
from runner.metrics import BrokerMetrics, CollectorRegistry
from runner.policy import POLICY_FILE, EffectivePolicy, TenantPolicy, load_policy
from runner.sandbox.base import MIB, Limits
from runner.settings import Settings, env_name, state_dir

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling, and with a started event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@dataclass
class RunningBroker:
    broker: Broker
    driver: BrokerDriver  # the broker's timer, and waits for its tasks
    url: str
    auth_token: str
    port: int
    registry: CollectorRegistry | None = None


class BrokerFactory(Protocol):
    """Makes the broker core that :func:`running_broker` serves (:class:`Broker` itself,
    or a subclass of the caller's: tests record what runners send with one)."""

    def __call__(
        self, config: BrokerConfig, *, metrics: BrokerMetrics, store: TaskStore
    ) -> Broker: ...


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InfrastructureError(f"Cannot listen on {host}:{port}", hint=exc.strerror) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def open_store(settings: Settings) -> TaskStore:
    """The store ``SANDBOX_BROKER_STORE`` names (the SQLite file made when missing).
    Raises :class:`InfrastructureError` when it cannot be opened (another broker holds
    it, a directory that cannot be written, a file of another schema version)."""
    spec = parse_store(settings.broker_store)
    if spec.kind == REDIS:
        assert spec.url is not None
        # (Its tenants' limits are the broker's configuration's: the core sets them.)
        return RedisStore(spec.url, broker_id=settings.broker_id, lease_s=settings.broker_lease_s)
    if spec.kind != SQLITE:
        return MemoryStore()
    return SqliteStore(spec.path or state_dir(settings) / SQLITE_FILE_NAME)


def broker_config(
    settings: Settings, limits: Limits | None = None, *, policy: EffectivePolicy | None = None
) -> BrokerConfig:
    """The broker's configuration; ``limits``: the policy's (loaded here when not given);
    ``policy``: its tenant profiles' timeouts and quotas (none when not given)."""
    limits = limits or load_policy(settings).limits
    tenants = policy.tenants if policy is not None else {}
    return BrokerConfig(
        default_timeout_s=limits.timeout_s,
        tenant_timeouts_s={
            name: tenant.limits.timeout_s for name, tenant in tenants.items() if tenant.profile
        },
        timeout_grace_s=settings.broker_timeout_grace_s,
        runner_lost_grace_s=settings.runner_lost_grace_s,
        queue_timeout_s=settings.queue_timeout_s,
        tenant_quota=settings.tenant_quota,
        tenant_quotas=tenant_quotas(settings, policy),
        max_print_calls=settings.max_print_calls,
        max_print_chars=limits.output_bytes,
        max_queued_bytes_per_tenant=settings.tenant_queued_bytes,
        max_retained_bytes_per_tenant=settings.tenant_retained_bytes,
        defer_result_checks=True,  # in the driver's schema workers
    )


def tenant_quotas(settings: Settings, policy: EffectivePolicy | None) -> dict[str, int]:
    """``SANDBOX_TENANT_QUOTAS`` with the quotas of the tenant profiles; one tenant in
    both is a configuration error (which one would the auditor's reading be?)."""
    quotas = dict(settings.tenant_quota_overrides)
    if policy is None:
        return quotas
    for name, tenant in policy.tenants.items():
        if tenant.profile is None or tenant.profile.config.quota is None:
            continue
        if name in quotas:
            raise ConfigurationError(
                f"Tenant {name}'s quota is set twice: {env_name('tenant_quotas')} and "
                f"{policy.bundle.directory / tenant.profile.file}",
                hint="keep one: the profile (reviewed with the bundle) or the setting",
            )
        quotas[name] = tenant.profile.config.quota
    return quotas


def ceiling_sources(
    policy: EffectivePolicy, tenant: TenantPolicy | None = None
) -> dict[str, LimitSource]:
    """Where each per-task ceiling of the API comes from: a setting, the bundle, or (for
    ``tenant``) the tenant's profile when it sets the limit."""
    bounds = policy.bundle.config.limits
    sets = tenant.sets if tenant is not None else frozenset()
    sources = {}
    for api_name, setting, key in (
        ("timeoutSeconds", "task_timeout_s", "timeout_s"),
        ("memoryMb", "memory_mb", "memory_mb"),
        ("cpus", "cpus", "cpus"),
    ):
        profile = tenant.profile.file if tenant and tenant.profile and key in sets else None
        sources[api_name] = LimitSource(
            variable=env_name(setting),
            is_set=setting in policy.tightened,
            bundle_key=f"limits.{key}",
            bundle_file=str(policy.bundle.directory / POLICY_FILE),
            bundle_ceiling=getattr(bounds, key).ceiling,
            profile=profile,
        )
    return sources


def log_tenants(settings: Settings, policy: EffectivePolicy) -> None:
    """Say at start which profile each tenant of the API keys gets; warn of a profile no
    key maps to (a typo in either would silently leave a tenant with the defaults)."""
    keyed = sorted(set(settings.api_key_tenants.values()))
    for name in keyed:
        tenant = policy.for_tenant(name)
        if tenant.profile is None:
            log.info("tenant %s: no profile, the defaults", name)
        else:
            log.info(
                "tenant %s: profile %s (sha256 %s)",
                name,
                tenant.profile.file,
                tenant.profile.sha256,
            )
    if keyed:
        for name in sorted(set(policy.tenants) - set(keyed)):
            log.warning(
                "tenant profile tenants/%s.toml: no API key of %s maps to tenant %s",
                name,
                env_name("api_keys"),
                name,
            )


def tenant_ceilings(policy: EffectivePolicy) -> dict[str, TenantCeilings]:
    """What each tenant with a profile may ask for per task (the runner's same profile)."""
    return {
        name: TenantCeilings(
            ceilings=TaskLimits(
                tenant.limits.timeout_s, tenant.limits.memory_bytes // MIB, tenant.limits.cpus
            ),
            sources=ceiling_sources(policy, tenant),
            max_code_bytes=tenant.limits.code_bytes,
        )
        for name, tenant in policy.tenants.items()
    }


@contextlib.asynccontextmanager
async def running_broker(
    settings: Settings,
    *,
    auth_token: str | None = None,
    log_level: str = "warning",
    registry: CollectorRegistry | None = None,
    broker_factory: BrokerFactory = Broker,
    store: TaskStore | None = None,
) -> AsyncIterator[RunningBroker]:
    """Serve the broker until the block ends; then drain, close runners and stop.

    Its metrics go to ``registry`` (a new one by default) and are served at ``/metrics``;
    ``up`` passes one registry to the broker and its runner, so one scrape sees both.
    ``broker_factory`` makes the broker core (:class:`Broker` by default), over the
    store ``SANDBOX_BROKER_STORE`` names (:func:`open_store`), closed at the end; or
    over ``store``, opened by the caller (``up`` opens it before its runner's slow
    start, so a store it cannot open fails at once) and closed by it.
    """
    token = auth_token or (
        settings.auth_token.get_secret_value() if settings.auth_token else secrets.token_urlsafe(24)
    )
    policy = load_policy(settings)
    log_tenants(settings, policy)
    limits = policy.limits
    registry = registry if registry is not None else CollectorRegistry()
    own_store = store is None
    store = open_store(settings) if store is None else store
    # Closed last, whatever happens from here on (a busy port, a failed start).
    with contextlib.closing(store) if own_store else contextlib.nullcontext(store):
        metrics = BrokerMetrics(registry)
        broker = broker_factory(
            broker_config(settings, limits, policy=policy), metrics=metrics, store=store
        )
        # Callers' schemas are checked in worker processes sized for the largest data a
        # check gets: a request body, or a result within the runner's output cap.
        schemas = SchemaPool(
            max_payload_bytes=max(settings.max_request_bytes, limits.output_bytes),
            metrics=metrics,
        )
        driver = BrokerDriver(broker, schemas)
        app = create_app(
            driver,
            GrantTokens(settings.grant_token_ttl_s),
            ApiConfig(
                auth_token=token,
                api_keys=settings.api_key_tenants,
                max_request_bytes=settings.max_request_bytes,
                # The runner's effective limits (policy bundle + settings) cap API requests.
                ceilings=TaskLimits(limits.timeout_s, limits.memory_bytes // MIB, limits.cpus),
                ceiling_sources=ceiling_sources(policy),
                max_code_bytes=limits.code_bytes,
                max_request_json_values=settings.max_request_json_values,
                tenants=tenant_ceilings(policy),
            ),
            registry=registry,
        )
        sock = bind(settings.broker_host, settings.broker_port)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            ws="websockets-sansio",
            ws_max_size=settings.max_payload,
            ws_ping_interval=settings.heartbeat_interval_s,
            ws_ping_timeout=settings.heartbeat_interval_s,
            lifespan="off",
            log_config=None,
            log_level=log_level,
            access_log=False,
            # Requests still open when we stop (long-polls are woken by drain) get this long.
            timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_timeout_s),
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        await asyncio.wait(
            [serving, asyncio.ensure_future(server.ready.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if serving.done():
            serving.result()  # re-raise what went wrong at start-up
        host = (
            settings.broker_host if ":" not in settings.broker_host else f"[{settings.broker_host}]"
        )
        # A store other brokers share: this broker's lease, its claims from the queue.
        link = None
        if store.is_shared:
            cluster = ClusterLink(driver, cast(SharedStore, store), metrics)
            link = asyncio.create_task(cluster.run())
        try:
            yield RunningBroker(broker, driver, f"http://{host}:{port}", token, port, registry)
        finally:
            try:
                driver.drain()
                drained = await driver.wait_idle(settings.graceful_shutdown_timeout_s)
                if not drained:
                    count = broker.running_count()
                    log.warning("broker stopping with %d task(s) still running", count)
                broker.close_all(1001, "broker shutting down")
                await asyncio.sleep(0)  # let the writers send their close frames
                server.should_exit = True
                await serving
            finally:
                if link is not None:
                    link.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await link
                # Whatever stopping did: no schema worker outlives the broker.
                await driver.aclose()
                await schemas.aclose()
                sock.close()
