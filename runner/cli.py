"""``sandbox-runner``: the command line.

Owns: argument parsing, turning faults into one-line messages and exit codes, and
output formats. Exit codes: 0 success, 1 the task failed, 2 usage, configuration
or infrastructure error (one human line on stderr, never a traceback).
Settings are built here, once, and passed down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.cli_policy import policy, selfcheck
from runner.cli_service import broker, healthcheck, serve, up
from runner.cli_support import (
    EXIT_TASK_FAILED,
    _fail,
    _progress,
    _run,
    _settings,
)
from runner.errors import ConfigurationError
from runner.logs import setup_logging
from runner.pipeline import TaskRequest
from runner.sandbox.base import JSON, Mode

MODE_CHOICES = ["all_items", "per_item", "runOnceForAllItems", "runOnceForEachItem"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sandbox-runner")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and retries to stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="SANDBOX_LOG_FORMAT",
    show_envvar=True,
    help="Log lines for people, or one JSON object per line (with the task id).",
)
def main(verbose: bool, log_format: str) -> None:
    """Run untrusted Python in hardened, short-lived containers, one per task.

    Results and reports a program reads are JSON on stdout; progress and logs go to
    stderr. Exit codes: 0 success, 1 the task (or check) failed, 2 usage,
    configuration or infrastructure error.
    """
    setup_logging(level=logging.DEBUG if verbose else logging.WARNING, log_format=log_format)


# --- exec ------------------------------------------------------------------------


def parse_items(raw: str | None) -> list[JSON]:
    """``--items``: a file or inline JSON; a list of n8n items or of plain objects."""
    if raw is None:
        return []
    path = Path(raw)
    text = raw
    if not raw.lstrip().startswith(("[", "{")) and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not a JSON file or JSON text: {exc}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise click.BadParameter("must be a JSON list of items (objects)")
    items: list[JSON] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise click.BadParameter(f"item {index} is {type(item).__name__}, not an object")
        items.append(item if "json" in item else {"json": item})
    return items


def _read_code(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {source}: {exc}", param_hint="FILE") from None


@main.command("exec")
@click.argument("source", metavar="FILE|-")
@click.option(
    "--items", "items_raw", metavar="FILE|JSON", help="Input items (n8n items or plain objects)."
)
@click.option(
    "--mode",
    type=click.Choice(MODE_CHOICES),
    default="all_items",
    show_default=True,
    help="Run once for all items, or once per item.",
)
@click.option("--continue-on-fail", is_flag=True, help="Turn a run failure into an error item.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Task timeout in seconds (default: N8N_RUNNERS_TASK_TIMEOUT or 60).",
)
@click.option("--pretty", is_flag=True, help="Human-readable output instead of JSON.")
def exec_command(
    source: str,
    items_raw: str | None,
    mode: str,
    continue_on_fail: bool,
    timeout_s: float | None,
    pretty: bool,
) -> None:
    """Run one task (FILE, or - for stdin) in a fresh container and print its result.

    The code is the body of a function, as in n8n's Code node: it reads ``_items``
    (all items) or ``_item`` (per item) and ``return``s the result.
    """
    from runner.wiring import docker_pipeline

    code = _read_code(source)
    items = parse_items(items_raw)
    settings = _settings()
    request = TaskRequest(
        code=code, items=items, mode=Mode.parse(mode), continue_on_fail=continue_on_fail
    )

    async def go() -> dict[str, Any]:
        async with docker_pipeline(
            settings, _progress, timeout_s=timeout_s, warm_pool=False
        ) as pipeline:
            report = await pipeline.run(request)
        return report.document()

    document = _run(go)
    if pretty:
        click.echo(_pretty(document))
    else:
        click.echo(to_json(document))
    if document["status"] != "success":
        sys.exit(EXIT_TASK_FAILED)


def to_json(document: object, indent: int | None = None) -> str:
    """Readable UTF-8 JSON; ASCII escapes when a lone surrogate cannot be printed."""
    text = json.dumps(document, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, ensure_ascii=True, indent=indent)
    return text


def _pretty(document: dict[str, Any]) -> str:
    lines: list[str] = []
    for entry in document.get("prints", []):
        lines.append("print: " + " ".join(entry))
    if document["status"] == "success":
        lines.append("result:")
        lines.append(to_json(document["result"], indent=2))
    else:
        error = document["error"]
        lines.append(f"error [{error['code']} at {error['stage']}]: {error['message']}")
        if error["description"]:
            lines.append(error["description"])
    audit = document["audit"]
    durations = audit["durationsMs"]
    container = audit["containerId"]
    if container:
        start = (audit.get("details") or {}).get("containerStart", "")
        phases = ", ".join(
            f"{label} {durations[key]:.0f} ms"
            for key, label in (("containerSetup", "set-up"), ("run", "run"))
            if key in durations
        )
        where = f"{start} container {container[:12]}".strip() + (f": {phases}" if phases else "")
    else:
        where = "no container: stopped by the analyzer"
    lines.append(f"took {durations['total']:.0f} ms ({where})")
    return "\n".join(lines)


# --- image -----------------------------------------------------------------------


@main.group()
def image() -> None:
    """Build or inspect the task image and the runner image."""


@image.command("build")
def image_build() -> None:
    """Build the task image if its inputs changed (bootstraps the Debian base if needed)."""
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder
    from runner.wiring import image_recipe

    settings = _settings()

    async def go() -> str:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        builder = ImageBuilder(client, image_recipe(settings), _progress)
        return await asyncio.to_thread(builder.ensure)

    click.echo(_run(go))


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
    from runner.runner_image import RunnerImageBuilder, RunnerImageRecipe
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder
    from runner.settings import PROJECT_ROOT
    from runner.wiring import image_recipe

    settings = _settings()

    async def go() -> str:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        base = ImageBuilder(client, image_recipe(settings), _progress)
        recipe = RunnerImageRecipe(project_dir or PROJECT_ROOT)
        return await asyncio.to_thread(RunnerImageBuilder(client, recipe, base, _progress).ensure)

    click.echo(_run(go))


@image.command("tag")
def image_tag() -> None:
    """Print the tag the current sources map to (nothing is built)."""
    from runner.sandbox.docker import connect
    from runner.sandbox.image import ImageBuilder
    from runner.wiring import image_recipe

    settings = _settings()

    async def go() -> str | None:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        return await asyncio.to_thread(
            ImageBuilder(client, image_recipe(settings), _progress).current_tag
        )

    tag = _run(go)
    if tag is None:
        _fail("the base image does not exist yet; run `sandbox-runner image build`")
    click.echo(tag)


@main.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def sweep(as_json: bool) -> None:
    """Remove this runner's leftover task containers and any orphan past its deadline."""
    from runner.sandbox.docker import DockerSandbox, connect
    from runner.wiring import load_isolation

    settings = _settings()

    async def go() -> list[str]:
        client = await asyncio.to_thread(connect, settings.docker_api_timeout_s)
        sandbox = DockerSandbox(
            client,
            image=settings.image or "unused",
            isolation=load_isolation(settings),
            runner_id=settings.runner_id,
        )
        try:
            return await sandbox.sweep()
        finally:
            await sandbox.aclose()

    removed = _run(go)
    if as_json:
        click.echo(json.dumps({"removed": removed}))
    elif removed:
        click.echo(f"removed {len(removed)} container(s): {' '.join(c[:12] for c in removed)}")
    else:
        click.echo("nothing to remove")


main.add_command(serve)
main.add_command(healthcheck)
main.add_command(broker)
main.add_command(up)
main.add_command(policy)
main.add_command(selfcheck)

__all__ = ["ConfigurationError", "main", "parse_items"]
