"""``sandbox-runner exec``: one task in a fresh container, its result on stdout.

Owns: reading the task's code and ``--items``, the result document as JSON (or,
with ``--pretty``, as text for people) and the exit code (1 when the task failed).
The pipeline that runs it comes from :mod:`runner.cli.wiring`. Registered in
:mod:`runner.cli.app` with ``main.add_command``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from runner.cli import support
from runner.cli.support import EXIT_TASK_FAILED
from runner.pipeline import TaskRequest
from runner.sandbox.base import JSON, Mode

MODE_CHOICES = ["all_items", "per_item", "runOnceForAllItems", "runOnceForEachItem"]


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


@click.command("exec")
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
    from runner.cli.wiring import task_pipeline

    code = _read_code(source)
    items = parse_items(items_raw)
    settings = support.settings()
    request = TaskRequest(
        code=code, items=items, mode=Mode.parse(mode), continue_on_fail=continue_on_fail
    )

    async def go() -> dict[str, Any]:
        async with task_pipeline(
            settings, support.progress, timeout_s=timeout_s, warm_pool=False, variants=False
        ) as pipeline:
            report = await pipeline.run(request)
        return report.document()

    document = support.run(go)
    if pretty:
        click.echo(render_pretty(document))
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


def render_pretty(document: dict[str, Any]) -> str:
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


__all__ = ["exec_command", "parse_items", "render_pretty", "to_json"]
