"""Builds the pipeline from settings: Docker client, image, isolation, sandbox.

The only place that turns :class:`~runner.settings.Settings` into objects; each
command of :mod:`runner.cli` calls it once and passes the result down (the tests,
``bench/`` and :mod:`runner.testing` call it too, to build what a command would).
Limits, guards, the image's uid and the isolation come from the policy bundle with
the settings applied (:func:`runner.policy.load_policy`); a pipeline proves the
isolation with the self-check (:mod:`runner.selfcheck`) before it runs any task.

Which engine makes task containers (``SANDBOX_BACKEND``): Docker, or an OCI runtime
driven directly (:mod:`runner.sandbox.oci`); ``auto`` takes the OCI backend when it
can run here and its self-check passes, else Docker, and logs why. Docker builds the
task image either way.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.analyzer import Analyzer
from runner.analyzer.pool import AnalysisPool
from runner.errors import ConfigurationError, InfrastructureError
from runner.pipeline import AuditContext, ImageVariantSandbox, TaskPipeline
from runner.policy import EffectivePolicy, load_bundle, load_policy
from runner.profiles import tenant_profiles
from runner.sandbox.base import Limits, Sandbox, SandboxKernel
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.docker import DockerSandbox, connect, describe_daemon
from runner.sandbox.image import ImageBuilder, ImageRecipe, Progress
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.oci import cgroups
from runner.sandbox.oci.rootfs import RootfsStore
from runner.sandbox.oci.runtime import OciRuntime, find_runtime, why_not
from runner.sandbox.oci.sandbox import OciSandbox
from runner.sandbox.packages import load_lock
from runner.sandbox.pool import PoolConfig
from runner.selfcheck import (
    SelfCheckCache,
    SelfCheckReport,
    SelfCheckTarget,
    default_cache_dir,
    ensure_selfcheck,
    run_selfcheck,
)
from runner.settings import Settings
from runner.settings import state_dir as settings_state_dir

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)


def limits_from(
    settings: Settings, *, timeout_s: float | None = None, policy: EffectivePolicy | None = None
) -> Limits:
    """The bundle's limits with the settings applied; ``timeout_s`` (``--timeout``) too."""
    policy = policy or load_policy(settings)
    if timeout_s is None:
        return policy.limits
    return replace(policy.limits, timeout_s=policy.check_timeout(timeout_s, "--timeout"))


def image_recipe(
    settings: Settings, *, policy: EffectivePolicy | None = None, variant: str | None = None
) -> ImageRecipe:
    """The task image the bundle describes (``variant``: that ``[image.variants]``
    image); its packages from the bundle's lock (a missing or stale lock is a
    :class:`ConfigurationError` naming the file)."""
    bundle = policy.bundle if policy else load_bundle(settings.policy_dir)
    image = bundle.config.image
    requested = image.packages_by_image().get(variant)
    if requested is None:
        raise ConfigurationError(
            f"no image variant {variant!r} in {bundle.directory / 'sandbox.toml'}",
            hint=f"declared: {', '.join(sorted(image.variants)) or 'none'}",
        )
    return ImageRecipe(
        image_dir=settings.image_dir,
        base_image=settings.base_image,
        debian_suite=settings.debian_suite,
        debian_mirror=settings.debian_mirror,
        repository=image.repository,
        uid=image.uid,
        packages=load_lock(bundle.directory, requested, variant=variant),
    )


def image_variants(policy: EffectivePolicy) -> tuple[str, ...]:
    """The ``[image.variants]`` some tenant profile names: the images a runner of this
    bundle makes ready (a variant no tenant uses is built by `image build` only)."""
    named = {t.image_variant for t in policy.tenants.values() if t.image_variant is not None}
    return tuple(sorted(named))


def load_isolation(settings: Settings, *, policy: EffectivePolicy | None = None) -> IsolationConfig:
    """The isolation of every task container, from the (validated) policy bundle."""
    return IsolationConfig.from_policy(policy or load_policy(settings))


def selfcheck_cache(settings: Settings) -> SelfCheckCache:
    """One per process: later look-ups are answered from memory."""
    return SelfCheckCache(settings.selfcheck_cache_dir or default_cache_dir())


def describe_engine(sandbox: ContainerSandbox[Any], client: DockerClient) -> dict[str, str]:
    """Who makes the containers (the self-check's cache key, and the audit record's)."""
    if isinstance(sandbox, OciSandbox):
        runtime = sandbox.runtime
        return {
            "backend": "oci",
            "id": f"oci:{runtime.kind}:{platform.node()}",
            "runtime": runtime.kind,
            "runtimePath": runtime.path,
            "runtimeVersion": runtime.version(),
            "kernelVersion": platform.release(),
            "architecture": platform.machine(),
            "cgroupLayout": cgroups.layout(),
        }
    return {"backend": "docker", **describe_daemon(client)}


def engine_report(engine: dict[str, str]) -> dict[str, str]:
    """The audit record's words for who made a task's container."""
    if engine.get("backend") == "oci":
        return {"backend": "oci", "runtime": engine.get("runtimeVersion", "")}
    return {
        "backend": "docker",
        "runtime": f"{engine.get('defaultRuntime', '')} (Docker {engine.get('serverVersion', '')})",
    }


async def selfcheck_target(
    settings: Settings,
    sandbox: ContainerSandbox[Any],
    client: DockerClient,
    *,
    policy: EffectivePolicy,
    image: str,
    image_id: str | None,
) -> SelfCheckTarget:
    engine = await asyncio.to_thread(describe_engine, sandbox, client)
    return SelfCheckTarget(
        sandbox=sandbox,
        policy=policy,
        apparmor_profile=sandbox.isolation.apparmor_profile,
        daemon=engine,
        image=image,
        image_id=image_id,
        runner_id=settings.runner_id,
        kernel=sandbox.kernel,
        host_view=sandbox,
    )


def make_pipeline(
    settings: Settings,
    sandbox: Sandbox,
    *,
    image: str,
    image_id: str | None,
    isolation: dict[str, Any],
    timeout_s: float | None = None,
    policy: EffectivePolicy | None = None,
    runtime_tier: str = "standard",
    variants: Sequence[ImageVariantSandbox] = (),
    variants_missing: str = "this runner has the task image only",
) -> TaskPipeline:
    """``runtime_tier``: what the sandbox gives (``gvisor`` on runsc): a tenant whose
    profile asks for a tier this runner does not have gets its tasks refused; so does
    one whose image variant is not among ``variants`` (``variants_missing`` says why)."""
    policy = policy or load_policy(settings)
    analyzer = Analyzer(policy.import_policy)
    limits = limits_from(settings, timeout_s=timeout_s, policy=policy)
    # Analysis workers sized for the largest code any tenant's profile accepts.
    code_bytes = max([limits.code_bytes, *(t.limits.code_bytes for t in policy.tenants.values())])
    return TaskPipeline(
        sandbox=sandbox,
        analyzer=analyzer,
        guards=policy.guards,
        limits=limits,
        context=AuditContext(
            runner_id=settings.runner_id,
            image=image,
            image_id=image_id,
            isolation=isolation,
            policy_sha256=policy.sha256,
        ),
        analysis=AnalysisPool(code_bytes=code_bytes),
        profiles=tenant_profiles(
            policy,
            analyzer,
            limits,
            runtime_tier,
            {variant.name: variant for variant in variants},
            variants_missing,
        ),
        variants=variants,
    )


def runtime_tier(sandbox: ContainerSandbox[Any]) -> str:
    """The runtime tier a sandbox gives its tasks (a tenant profile's ``runtime``):
    ``gvisor`` when gVisor's kernel answers their system calls, else ``standard``."""
    return "gvisor" if sandbox.kernel is SandboxKernel.GVISOR else "standard"


def make_docker_sandbox(
    settings: Settings,
    client: DockerClient,
    *,
    image: str,
    ensure_image: Callable[[], str] | None,
    warm_pool: bool = True,
    timeout_s: float | None = None,
    policy: EffectivePolicy | None = None,
    isolation: IsolationConfig | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> DockerSandbox:
    """``isolation`` overrides the policy's (tests swap in Docker's default profile);
    ``on_retry`` is told the cause of every set-up retry (the service's metrics)."""
    policy = policy or load_policy(settings)
    return DockerSandbox(
        client,
        image=image,
        isolation=isolation or load_isolation(settings, policy=policy),
        runner_id=settings.runner_id,
        ensure_image=ensure_image,
        setup_attempts=settings.setup_attempts,
        setup_backoff_max_s=settings.setup_backoff_max_s,
        pool=pool_config(settings, policy.preload) if warm_pool else None,
        pool_limits=limits_from(settings, timeout_s=timeout_s, policy=policy),
        on_retry=on_retry,
    )


def state_dir(settings: Settings) -> Path:
    """The OCI backend's state directory (:func:`runner.settings.state_dir`)."""
    return settings_state_dir(settings)


def oci_runtime(settings: Settings) -> OciRuntime | str:
    """The runtime ``SANDBOX_OCI_RUNTIME`` names, or why the OCI backend cannot run here."""
    found = find_runtime(settings.oci_runtime)
    if found is None:
        return (
            f"no OCI runtime {settings.oci_runtime!r} is installed "
            "(`make setup` installs runc; runsc and crun are Debian packages too)"
        )
    kind, path = found
    problem = why_not(kind)
    if problem is not None:
        return problem
    return OciRuntime(kind, path, state_dir(settings) / f"runtime-{kind}")


def make_oci_sandbox(
    settings: Settings,
    client: DockerClient,
    runtime: OciRuntime,
    *,
    image: str,
    warm_pool: bool = True,
    timeout_s: float | None = None,
    policy: EffectivePolicy | None = None,
    isolation: IsolationConfig | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> OciSandbox:
    """The OCI backend over ``runtime``; the image is unpacked from ``client``'s daemon;
    ``on_retry`` is told the cause of every set-up retry (the service's metrics)."""
    policy = policy or load_policy(settings)
    isolation = isolation or load_isolation(settings, policy=policy)
    directory = state_dir(settings)
    return OciSandbox(
        runtime,
        RootfsStore(directory / "rootfs", client, task_uid=isolation.uid_gid[0]),
        image=image,
        isolation=isolation,
        runner_id=settings.runner_id,
        state_dir=directory,
        setup_attempts=settings.setup_attempts,
        setup_backoff_max_s=settings.setup_backoff_max_s,
        pool=pool_config(settings, policy.preload) if warm_pool else None,
        pool_limits=limits_from(settings, timeout_s=timeout_s, policy=policy),
        on_retry=on_retry,
    )


def pool_config(settings: Settings, preload: tuple[str, ...] = ()) -> PoolConfig:
    """The warm pool of ``settings``; ``preload``: the policy's modules a slot imports
    before its task (:attr:`~runner.policy.effective.EffectivePolicy.preload`)."""
    return PoolConfig(
        size=settings.pool_size,
        refill_concurrency=settings.pool_refill_concurrency,
        max_idle_s=settings.pool_max_idle_s,
        preload=preload,
    )


@asynccontextmanager
async def task_pipeline(
    settings: Settings,
    progress: Progress,
    *,
    timeout_s: float | None = None,
    warm_pool: bool = True,
    selfcheck: SelfCheckCache | None = None,
    backend: str | None = None,
    on_retry: Callable[[str], None] | None = None,
    variants: bool = True,
) -> AsyncIterator[TaskPipeline]:
    """A ready pipeline on this host; removes what it created on exit.

    ``backend`` (default: ``SANDBOX_BACKEND``) chooses the engine: ``docker``, ``oci``,
    or ``auto`` (the OCI backend when it can run here and its self-check passes, else
    Docker; the log says why). ``warm_pool=False`` for one-shot use (``exec``): a pool
    would start containers that no task takes. Before any task, the self-check proves
    the policy's guarantees on the chosen engine (cached per engine, policy hash and
    image in ``selfcheck``, by default the settings' cache) and raises
    :class:`~runner.errors.IsolationNotEnforcedError` when a required one is missing;
    what it proved, and which engine and runtime, go into every audit record.
    ``on_retry`` goes to the sandbox: told the cause of every container set-up retry
    (``serve`` and ``up`` pass their metrics' counter). ``variants``: make ready the
    ``[image.variants]`` the tenant profiles name (:func:`variant_sandbox`; ``exec``,
    which names no tenant, does without).
    """
    policy = load_policy(settings)  # a bad bundle or setting stops here, before Docker
    if timeout_s is not None:
        policy.check_timeout(timeout_s, "--timeout")
    client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
    try:
        builder = ImageBuilder(client, image_recipe(settings, policy=policy), progress)
        image: str = settings.image if settings.image else await asyncio.to_thread(builder.ensure)
        image_id = await asyncio.to_thread(builder.image_id, image)
        cache = selfcheck or selfcheck_cache(settings)
        choice = backend or settings.backend
        sandbox: ContainerSandbox[Any] | None = None
        report: SelfCheckReport | None = None
        if choice in ("auto", "oci"):
            runtime = oci_runtime(settings)
            if isinstance(runtime, str):
                if choice == "oci":
                    raise ConfigurationError("SANDBOX_BACKEND=oci cannot run here", hint=runtime)
                log.warning(
                    "task containers through Docker: the OCI backend cannot run here: %s", runtime
                )
            else:
                oci = make_oci_sandbox(
                    settings,
                    client,
                    runtime,
                    image=image,
                    warm_pool=warm_pool,
                    timeout_s=timeout_s,
                    policy=policy,
                    on_retry=on_retry,
                )
                try:
                    report = await _prove(settings, oci, client, policy, image, image_id, cache)
                except InfrastructureError as exc:
                    await oci.aclose()
                    if choice == "oci":
                        raise
                    log.warning(
                        "task containers through Docker: the OCI backend (%s) failed: %s",
                        runtime.kind,
                        exc,
                    )
                else:
                    sandbox = oci
        if sandbox is None:
            sandbox = make_docker_sandbox(
                settings,
                client,
                image=image,
                ensure_image=None if settings.image else builder.ensure,
                warm_pool=warm_pool,
                timeout_s=timeout_s,
                policy=policy,
                on_retry=on_retry,
            )
            report = await _prove(settings, sandbox, client, policy, image, image_id, cache)
        assert report is not None
        engine = await asyncio.to_thread(describe_engine, sandbox, client)
        log.info("task containers: %s", engine_report(engine))
        ready: list[ImageVariantSandbox] = []
        try:
            if variants and not settings.image:
                for name in image_variants(policy):
                    made = await variant_sandbox(
                        settings,
                        client,
                        sandbox,
                        name,
                        progress,
                        policy,
                        cache,
                        timeout_s,
                        on_retry=on_retry,
                        engine=engine_report(engine),
                    )
                    ready.append(made)
            await sandbox.warm_up()
            yield make_pipeline(
                settings,
                sandbox,
                image=image,
                image_id=image_id,
                isolation={**sandbox.isolation.report(report.audit()), **engine_report(engine)},
                timeout_s=timeout_s,
                policy=policy,
                runtime_tier=runtime_tier(sandbox),
                variants=ready,
                variants_missing=(
                    "SANDBOX_IMAGE pins one task image: image variants are built from the bundle"
                    if settings.image
                    else "this runner has the task image only"
                ),
            )
        finally:
            for variant in ready:
                await variant.sandbox.aclose()
            await sandbox.aclose()
    finally:
        await asyncio.to_thread(client.close)


async def variant_sandbox(
    settings: Settings,
    client: DockerClient,
    default: ContainerSandbox[Any],
    name: str,
    progress: Progress,
    policy: EffectivePolicy,
    cache: SelfCheckCache,
    timeout_s: float | None = None,
    on_retry: Callable[[str], None] | None = None,
    engine: Mapping[str, str] | None = None,
) -> ImageVariantSandbox:
    """The sandbox of image variant ``name``, proven: its image built when missing
    (tagged by its lock's hash, like the default one), made by ``default``'s engine
    with the same isolation and limits, and its own self-check passed (cached per
    image), so a tenant's image never runs under less than the default image's proof;
    its tasks' records carry that report (``engine``: who makes the containers).

    No warm pool: a variant's tasks start cold (an idle slot per variant would cost
    every runner memory for tenants it may never see). No sweep either: ``default``'s
    swept this runner's leftovers, and a second sweep could take its live roots.
    """
    builder = ImageBuilder(client, image_recipe(settings, policy=policy, variant=name), progress)
    image = await asyncio.to_thread(builder.ensure)
    image_id = await asyncio.to_thread(builder.image_id, image)
    made: ContainerSandbox[Any]
    if isinstance(default, OciSandbox):
        made = make_oci_sandbox(
            settings,
            client,
            default.runtime,
            image=image,
            warm_pool=False,
            timeout_s=timeout_s,
            policy=policy,
            on_retry=on_retry,
        )
    else:
        made = make_docker_sandbox(
            settings,
            client,
            image=image,
            ensure_image=builder.ensure,
            warm_pool=False,
            timeout_s=timeout_s,
            policy=policy,
            on_retry=on_retry,
        )
    try:
        target = await selfcheck_target(
            settings, made, client, policy=policy, image=image, image_id=image_id
        )
        report = await ensure_selfcheck(target, cache=cache)
    except BaseException:
        await made.aclose()
        raise
    log.info("image variant %s: %s (%s)", name, image, image_id)
    return ImageVariantSandbox(
        name=name,
        sandbox=made,
        image=image,
        image_id=image_id,
        isolation={**made.isolation.report(report.audit()), **(engine or {})},
    )


async def _prove(
    settings: Settings,
    sandbox: ContainerSandbox[Any],
    client: DockerClient,
    policy: EffectivePolicy,
    image: str,
    image_id: str | None,
    cache: SelfCheckCache,
) -> SelfCheckReport:
    """Sweep the engine's leftovers, then the self-check (cached when it passed before)."""
    await sandbox.sweep()
    target = await selfcheck_target(
        settings, sandbox, client, policy=policy, image=image, image_id=image_id
    )
    return await ensure_selfcheck(target, cache=cache)


def docker_pipeline(
    settings: Settings,
    progress: Progress,
    *,
    timeout_s: float | None = None,
    warm_pool: bool = True,
    selfcheck: SelfCheckCache | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> AbstractAsyncContextManager[TaskPipeline]:
    """:func:`task_pipeline` on the Docker backend, whatever the settings say."""
    return task_pipeline(
        settings,
        progress,
        timeout_s=timeout_s,
        warm_pool=warm_pool,
        selfcheck=selfcheck,
        backend="docker",
        on_retry=on_retry,
    )


async def backend_selfcheck(
    settings: Settings,
    progress: Progress,
    *,
    enforce_lint: bool = True,
    cache: SelfCheckCache | None = None,
    backend: str | None = None,
    variant: str | None = None,
) -> tuple[SelfCheckReport, dict[str, str]]:
    """Run the self-check now (``sandbox-runner selfcheck``) on the engine tasks would
    use (``auto``: the OCI backend when it can run here, else Docker), cache it when it
    passes, and say which engine it checked.

    Never raises for a missing guarantee: the report says which. ``enforce_lint=False``
    runs it on a bundle the linter rejects (to see what such a bundle really gives);
    tasks never run under such a bundle. ``variant``: check that ``[image.variants]``
    image instead of the default one (built when missing, as a runner would).
    """
    policy = load_policy(settings, enforce=enforce_lint)
    if variant is not None and settings.image:
        raise ConfigurationError(
            "SANDBOX_IMAGE pins one task image: an image variant is built from the bundle",
            hint="unset SANDBOX_IMAGE to check a variant",
        )
    recipe = image_recipe(settings, policy=policy, variant=variant)
    client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
    try:
        builder = ImageBuilder(client, recipe, progress)
        image: str = settings.image if settings.image else await asyncio.to_thread(builder.ensure)
        image_id = await asyncio.to_thread(builder.image_id, image)
        choice = backend or settings.backend
        runtime = oci_runtime(settings) if choice in ("auto", "oci") else "not asked for"
        if choice == "oci" and isinstance(runtime, str):
            raise ConfigurationError("SANDBOX_BACKEND=oci cannot run here", hint=runtime)
        sandbox: ContainerSandbox[Any]
        if isinstance(runtime, OciRuntime):
            sandbox = make_oci_sandbox(
                settings, client, runtime, image=image, warm_pool=False, policy=policy
            )
        else:
            sandbox = make_docker_sandbox(
                settings, client, image=image, ensure_image=None, warm_pool=False, policy=policy
            )
        try:
            target = await selfcheck_target(
                settings, sandbox, client, policy=policy, image=image, image_id=image_id
            )
            report = await run_selfcheck(target)
            if report.is_ok and enforce_lint:
                await asyncio.to_thread((cache or selfcheck_cache(settings)).put, report)
            return report, engine_report(dict(target.daemon))
        finally:
            await sandbox.aclose()
    finally:
        await asyncio.to_thread(client.close)
