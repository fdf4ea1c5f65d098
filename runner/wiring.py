"""Builds the pipeline from settings: Docker client, image, isolation, sandbox.

The only place that turns :class:`~runner.settings.Settings` into objects; the CLI
(and later the service) calls it once and passes the result down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from runner.analyzer import Analyzer
from runner.errors import ConfigurationError
from runner.pipeline import AuditContext, TaskPipeline
from runner.sandbox.base import MIB, GuardConfig, Limits, Sandbox
from runner.sandbox.docker import DockerSandbox, IsolationConfig, connect
from runner.sandbox.image import ImageBuilder, ImageRecipe, Progress
from runner.settings import Settings

if TYPE_CHECKING:
    from docker import DockerClient


def guard_config(settings: Settings) -> GuardConfig:
    policy = settings.import_policy
    return GuardConfig(
        stdlib_allow=tuple(sorted(policy.stdlib_allow)),
        external_allow=tuple(sorted(policy.external_allow)),
        builtins_deny=settings.builtins_deny_list,
        block_env_access=settings.block_env_access,
        max_print_calls=settings.max_print_calls,
    )


def limits_from(settings: Settings, *, timeout_s: float | None = None) -> Limits:
    return Limits(
        timeout_s=timeout_s if timeout_s is not None else settings.task_timeout_s,
        memory_bytes=settings.memory_mb * MIB,
        cpus=settings.cpus,
        pids=settings.pids_limit,
        tmpfs_bytes=settings.tmpfs_mb * MIB,
        output_bytes=settings.output_bytes,
        nofile=settings.nofile,
        fsize_bytes=settings.fsize_mb * MIB,
        nproc=settings.nproc,
    )


def image_recipe(settings: Settings) -> ImageRecipe:
    return ImageRecipe(
        image_dir=settings.image_dir,
        base_image=settings.base_image,
        debian_suite=settings.debian_suite,
        debian_mirror=settings.debian_mirror,
    )


def load_isolation(settings: Settings) -> IsolationConfig:
    try:
        return IsolationConfig.load(settings.seccomp_profile_path, settings.apparmor_profile)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"Cannot load the seccomp profile {settings.seccomp_profile_path}", hint=str(exc)
        ) from exc


def make_pipeline(
    settings: Settings,
    sandbox: Sandbox,
    *,
    image: str,
    image_id: str | None,
    isolation: dict[str, Any],
    timeout_s: float | None = None,
) -> TaskPipeline:
    return TaskPipeline(
        sandbox=sandbox,
        analyzer=Analyzer(settings.import_policy),
        guards=guard_config(settings),
        limits=limits_from(settings, timeout_s=timeout_s),
        context=AuditContext(
            runner_id=settings.runner_id, image=image, image_id=image_id, isolation=isolation
        ),
    )


def make_docker_sandbox(
    settings: Settings,
    client: DockerClient,
    *,
    image: str,
    ensure_image: Callable[[], str] | None,
) -> DockerSandbox:
    return DockerSandbox(
        client,
        image=image,
        isolation=load_isolation(settings),
        runner_id=settings.runner_id,
        ensure_image=ensure_image,
        setup_attempts=settings.setup_attempts,
        setup_backoff_max_s=settings.setup_backoff_max_s,
    )


@asynccontextmanager
async def docker_pipeline(
    settings: Settings, progress: Progress, *, timeout_s: float | None = None
) -> AsyncIterator[TaskPipeline]:
    """A ready pipeline on the local Docker host; removes what it created on exit."""
    load_isolation(settings)  # fail on a bad profile before touching Docker
    client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
    builder = ImageBuilder(client, image_recipe(settings), progress)
    image: str = settings.image if settings.image else await asyncio.to_thread(builder.ensure)
    image_id = await asyncio.to_thread(builder.image_id, image)
    sandbox = make_docker_sandbox(
        settings, client, image=image, ensure_image=None if settings.image else builder.ensure
    )
    try:
        await sandbox.sweep()
        yield make_pipeline(
            settings,
            sandbox,
            image=image,
            image_id=image_id,
            isolation=sandbox.isolation.report(),
            timeout_s=timeout_s,
        )
    finally:
        await sandbox.aclose()
