"""``sandbox-runner image build|build-runner|tag|lock``: the task image and the runner image.

Owns: the commands that build the images (each only when its inputs changed),
print the tag the current sources map to, or resolve the bundle's
``[image] python_packages`` into its lock file (:mod:`runner.sandbox.packages`).
The builds themselves are
:mod:`runner.sandbox.image` and :mod:`runner.runner_image`, their recipe from
:mod:`runner.cli.wiring`. Registered in :mod:`runner.cli.app` with
``main.add_command``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from runner.cli import support


@click.group()
def image() -> None:
    """Build or inspect the task image and the runner image."""


@image.command("build")
def image_build() -> None:
    """Build the task image if its inputs changed (bootstraps the Debian base if needed),
    and each [image.variants] image; print the tag of each (the default image's first)."""
    from runner.cli.wiring import image_recipe
    from runner.policy import load_bundle
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder

    settings = support.settings()

    async def go() -> list[str]:
        bundle = await asyncio.to_thread(load_bundle, settings.policy_dir)
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        tags: list[str] = []
        for variant in bundle.config.image.packages_by_image():
            recipe = image_recipe(settings, variant=variant)
            tag = await asyncio.to_thread(ImageBuilder(client, recipe, support.progress).ensure)
            tags.append(tag if variant is None else f"{tag} (variant {variant})")
        return tags

    click.echo("\n".join(support.run(go)))


@image.command("build-runner")
@click.option(
    "--project-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Source checkout with the Dockerfile (default: the one this runner runs from).",
)
def image_build_runner(project_dir: Path | None) -> None:
    """Build the runner image (the service itself) if its inputs changed; print its tag.

    Same base as the task image; the wheels are built on the host and installed
    offline in the image, so no registry is needed.
    """
    from runner.cli.wiring import image_recipe
    from runner.runner_image import RunnerImageBuilder, RunnerImageRecipe
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder
    from runner.settings import PROJECT_ROOT

    settings = support.settings()

    async def go() -> str:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        base = ImageBuilder(client, image_recipe(settings), support.progress)
        recipe = RunnerImageRecipe(project_dir or PROJECT_ROOT)
        return await asyncio.to_thread(
            RunnerImageBuilder(client, recipe, base, support.progress).ensure
        )

    click.echo(support.run(go))


@image.command("tag")
def image_tag() -> None:
    """Print the tag the current sources map to (nothing is built)."""
    from runner.cli.wiring import image_recipe
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder

    settings = support.settings()

    async def go() -> str | None:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        return await asyncio.to_thread(
            ImageBuilder(client, image_recipe(settings), support.progress).current_tag
        )

    tag = support.run(go)
    if tag is None:
        support.fail("the base image does not exist yet; run `sandbox-runner image build`")
    click.echo(tag)


@image.command("lock")
@click.option(
    "--check",
    is_flag=True,
    help="Only check that every lock matches its python_packages (no network); exit 1 if not.",
)
def image_lock(check: bool) -> None:
    """Resolve the bundle's [image] python_packages into its python-packages.lock, and
    each [image.variants.NAME] python_packages into python-packages.NAME.lock.

    pip on this host downloads binary wheels only (no package is built here), for the
    task image's interpreter, dependencies included; the lock pins each one by
    version and sha256, and the wheels stay in the cache for the next image build.
    Review the lock's diff like any policy change.
    """
    from runner.errors import RunnerError
    from runner.policy import PolicyBundle, load_bundle
    from runner.sandbox.packages import default_wheel_cache, load_lock, lock_file, resolve

    settings = support.settings()

    async def load() -> PolicyBundle:
        return await asyncio.to_thread(load_bundle, settings.policy_dir)

    bundle = support.run(load)
    failed = False
    for variant, requested in bundle.config.image.packages_by_image().items():
        path = bundle.directory / lock_file(variant)
        section = "[image]" if variant is None else f"[image.variants.{variant}]"
        if check:
            try:
                load_lock(bundle.directory, requested, variant=variant)
            except RunnerError as exc:
                click.echo(f"sandbox-runner: error: {exc}", err=True)
                failed = True
                continue
            click.echo(f"{path}: up to date" if requested else f"{section}: no package asked for")
            continue
        if not requested:
            path.unlink(missing_ok=True)
            click.echo(
                f"{section} python_packages is empty: no lock ({path} removed if it was there)"
            )
            continue

        async def go(requested: tuple[str, ...] = requested) -> str:
            cache = default_wheel_cache()
            return await asyncio.to_thread(resolve, requested, support.progress, cache=cache)

        path.write_text(support.run(go), encoding="utf-8")
        click.echo(str(path))
    if failed:
        raise SystemExit(1)


__all__ = ["image"]
