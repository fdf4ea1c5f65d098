"""Builds the pipeline from settings: Docker client, image, isolation, sandbox.

The only place that turns :class:`~runner.settings.Settings` into objects; each
command of :mod:`runner.cli` calls it once and passes the result down (the tests,
``bench/`` and :mod:`runner.testing` call it too, to build what a command would).
Limits, guards, the image's uid and the isolation come from the policy bundle with
the settings applied (:func:`runner.policy.load_policy`); a docker pipeline proves
the isolation with the self-check (:mod:`runner.selfcheck`) before it runs any task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from runner.analyzer import Analyzer
from runner.pipeline import AuditContext, TaskPipeline
from runner.policy import EffectivePolicy, load_bundle, load_policy
from runner.sandbox.base import Limits, Sandbox
from runner.sandbox.docker import DockerSandbox, connect, describe_daemon
from runner.sandbox.image import ImageBuilder, ImageRecipe, Progress
from runner.sandbox.isolation import IsolationConfig
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

if TYPE_CHECKING:
    from docker import DockerClient


def limits_from(
    settings: Settings, *, timeout_s: float | None = None, policy: EffectivePolicy | None = None
) -> Limits:
    """The bundle's limits with the settings applied; ``timeout_s`` (``--timeout``) too."""
    policy = policy or load_policy(settings)
    if timeout_s is None:
        return policy.limits
    return replace(policy.limits, timeout_s=policy.check_timeout(timeout_s, "--timeout"))


def image_recipe(settings: Settings, *, policy: EffectivePolicy | None = None) -> ImageRecipe:
    image = (policy.bundle if policy else load_bundle(settings.policy_dir)).config.image
    return ImageRecipe(
        image_dir=settings.image_dir,
        base_image=settings.base_image,
        debian_suite=settings.debian_suite,
        debian_mirror=settings.debian_mirror,
        repository=image.repository,
        uid=image.uid,
    )


def load_isolation(settings: Settings, *, policy: EffectivePolicy | None = None) -> IsolationConfig:
    """The isolation of every task container, from the (validated) policy bundle."""
    return IsolationConfig.from_policy(policy or load_policy(settings))


def selfcheck_cache(settings: Settings) -> SelfCheckCache:
    """One per process: later look-ups are answered from memory."""
    return SelfCheckCache(settings.selfcheck_cache_dir or default_cache_dir())


async def selfcheck_target(
    settings: Settings,
    sandbox: DockerSandbox,
    client: DockerClient,
    *,
    policy: EffectivePolicy,
    image: str,
    image_id: str | None,
) -> SelfCheckTarget:
    daemon = await asyncio.to_thread(describe_daemon, client)
    return SelfCheckTarget(
        sandbox=sandbox,
        policy=policy,
        apparmor_profile=sandbox.isolation.apparmor_profile,
        daemon=daemon,
        image=image,
        image_id=image_id,
        runner_id=settings.runner_id,
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
) -> TaskPipeline:
    policy = policy or load_policy(settings)
    return TaskPipeline(
        sandbox=sandbox,
        analyzer=Analyzer(policy.import_policy),
        guards=policy.guards,
        limits=limits_from(settings, timeout_s=timeout_s, policy=policy),
        context=AuditContext(
            runner_id=settings.runner_id,
            image=image,
            image_id=image_id,
            isolation=isolation,
            policy_sha256=policy.sha256,
        ),
    )


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
) -> DockerSandbox:
    """``isolation`` overrides the policy's (tests swap in Docker's default profile)."""
    policy = policy or load_policy(settings)
    return DockerSandbox(
        client,
        image=image,
        isolation=isolation or load_isolation(settings, policy=policy),
        runner_id=settings.runner_id,
        ensure_image=ensure_image,
        setup_attempts=settings.setup_attempts,
        setup_backoff_max_s=settings.setup_backoff_max_s,
        pool=pool_config(settings) if warm_pool else None,
        pool_limits=limits_from(settings, timeout_s=timeout_s, policy=policy),
    )


def pool_config(settings: Settings) -> PoolConfig:
    return PoolConfig(
        size=settings.pool_size,
        refill_concurrency=settings.pool_refill_concurrency,
        max_idle_s=settings.pool_max_idle_s,
    )


@asynccontextmanager
async def docker_pipeline(
    settings: Settings,
    progress: Progress,
    *,
    timeout_s: float | None = None,
    warm_pool: bool = True,
    selfcheck: SelfCheckCache | None = None,
) -> AsyncIterator[TaskPipeline]:
    """A ready pipeline on the local Docker host; removes what it created on exit.

    ``warm_pool=False`` for one-shot use (``exec``): a pool would start containers
    that no task takes. Before any task, the self-check proves the policy's
    guarantees (cached per daemon and policy hash in ``selfcheck``, by default the
    settings' cache) and raises :class:`~runner.errors.IsolationNotEnforcedError`
    when a required one is missing; what it proved goes into every audit record.
    """
    policy = load_policy(settings)  # a bad bundle or setting stops here, before Docker
    if timeout_s is not None:
        policy.check_timeout(timeout_s, "--timeout")
    client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
    builder = ImageBuilder(client, image_recipe(settings, policy=policy), progress)
    image: str = settings.image if settings.image else await asyncio.to_thread(builder.ensure)
    image_id = await asyncio.to_thread(builder.image_id, image)
    sandbox = make_docker_sandbox(
        settings,
        client,
        image=image,
        ensure_image=None if settings.image else builder.ensure,
        warm_pool=warm_pool,
        timeout_s=timeout_s,
        policy=policy,
    )
    try:
        await sandbox.sweep()
        target = await selfcheck_target(
            settings, sandbox, client, policy=policy, image=image, image_id=image_id
        )
        report = await ensure_selfcheck(target, cache=selfcheck or selfcheck_cache(settings))
        await sandbox.warm_up()
        yield make_pipeline(
            settings,
            sandbox,
            image=image,
            image_id=image_id,
            isolation=sandbox.isolation.report(report.audit()),
            timeout_s=timeout_s,
            policy=policy,
        )
    finally:
        await sandbox.aclose()


async def docker_selfcheck(
    settings: Settings,
    progress: Progress,
    *,
    enforce_lint: bool = True,
    cache: SelfCheckCache | None = None,
) -> SelfCheckReport:
    """Run the self-check now (``sandbox-runner selfcheck``) and cache it when it passes.

    Never raises for a missing guarantee: the report says which. ``enforce_lint=False``
    runs it on a bundle the linter rejects (to see what such a bundle really gives);
    tasks never run under such a bundle.
    """
    policy = load_policy(settings, enforce=enforce_lint)
    client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
    builder = ImageBuilder(client, image_recipe(settings, policy=policy), progress)
    image: str = settings.image if settings.image else await asyncio.to_thread(builder.ensure)
    image_id = await asyncio.to_thread(builder.image_id, image)
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
        return report
    finally:
        await sandbox.aclose()
