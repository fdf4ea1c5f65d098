"""``sandbox-runner image build|build-runner|tag``: the task image and the runner image.

Owns: the commands that build the images (each only when its inputs changed) or
print the tag the current sources map to. The builds themselves are
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
    """Build the task image if its inputs changed (bootstraps the Debian base if needed)."""
    from runner.cli.wiring import image_recipe
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder

    settings = support.settings()

    async def go() -> str:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        builder = ImageBuilder(client, image_recipe(settings), support.progress)
        return await asyncio.to_thread(builder.ensure)

    click.echo(support.run(go))


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


__all__ = ["image"]
