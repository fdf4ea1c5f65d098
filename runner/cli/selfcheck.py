"""``sandbox-runner selfcheck``: which isolation guarantees are in force, proven.

Owns: running the self-check on demand and its auditor-facing output (text and
``--json``). The canaries come from :mod:`runner.selfcheck`, the self-check's
Docker set-up from :mod:`runner.cli.wiring`. Registered in :mod:`runner.cli.app`
with ``main.add_command``.

Exit codes: 0 when every required guarantee holds, 1 when one does not; 2 for
usage, configuration or infrastructure errors (as everywhere).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from runner.cli import support
from runner.cli.support import EXIT_FINDINGS, report_json, wrap
from runner.policy import Severity, check_bundle, parse_bundle


@click.command("selfcheck")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@click.option(
    "--policy-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Check this bundle instead of the configured one (SANDBOX_POLICY_DIR).",
)
@click.option(
    "--skip-lint",
    is_flag=True,
    help="Diagnose a bundle the linter rejects (to see what it really enforces). "
    "Never used for running tasks; the result is not cached.",
)
@click.option(
    "--variant",
    default=None,
    metavar="NAME",
    help="Check the [image.variants] image NAME instead of the default task image.",
)
def selfcheck(as_json: bool, policy_dir: Path | None, skip_lint: bool, variant: str | None) -> None:
    """Prove, from inside canary containers, which isolation guarantees are in force.

    Prints every guarantee as pass, fail or not-available; exits 1 when a required
    one is not in force. The engine checked is the one tasks would use
    (SANDBOX_BACKEND; auto: the OCI backend when it can run here, else Docker). A
    passing result is cached per engine and policy hash, so `serve` and `exec` start
    without running the canaries again.
    """
    from runner.cli.wiring import backend_selfcheck

    settings = support.settings({"policy_dir": policy_dir} if policy_dir else None)
    if skip_lint:
        bundle, _ = parse_bundle(settings.policy_dir)
        errors = [f for f in check_bundle(bundle) if f.severity is Severity.ERROR] if bundle else []
        if errors:
            click.echo(
                f"note: {settings.policy_dir} fails `policy lint` ({len(errors)} error(s)); "
                "no task ever runs under it",
                err=True,
            )
    report, engine = support.run(
        lambda: backend_selfcheck(
            settings, support.progress, enforce_lint=not skip_lint, variant=variant
        )
    )
    document = {**report.as_json(), "engine": engine}
    if variant is not None:
        document["imageVariant"] = variant
    if as_json:
        click.echo(report_json(document))
    else:
        click.echo(render_selfcheck(document))
    if not report.is_ok:
        sys.exit(EXIT_FINDINGS)


# -- rendering --------------------------------------------------------------------------


def render_selfcheck(doc: dict[str, Any]) -> str:
    marks = {"pass": "PASS", "fail": "FAIL", "not-available": "N/A"}
    cached = " (cached)" if doc["cached"] else ""
    engine = doc.get("engine") or {}
    variant = f", image variant {doc['imageVariant']}" if doc.get("imageVariant") else ""
    lines = [
        f"selfcheck: policy sha256 {doc['policySha256']}{variant}",
        f"  {engine.get('backend', 'docker')} backend ({engine.get('runtime') or '?'}), "
        f"engine {doc['daemonId'] or '?'}, checked {doc['checkedAt']} in "
        f"{doc['durationMs']:.0f} ms{cached}",
    ]
    for item in doc["guarantees"]:
        kind = "required" if item["required"] else "optional"
        lines.append(
            wrap(
                item["detail"],
                " " * 41,
                f"  {marks[item['status']]:<5} {item['name']:<21} {kind:<9}  ",
            )
        )
    missing = [g["name"] for g in doc["guarantees"] if g["required"] and g["status"] != "pass"]
    optional = [g["name"] for g in doc["guarantees"] if not g["required"] and g["status"] != "pass"]
    if missing:
        lines.append(f"result: FAILED: required guarantees not in force: {', '.join(missing)}")
    else:
        note = f"; optional not in force: {', '.join(optional)}" if optional else ""
        lines.append(f"result: OK: every required guarantee holds{note}")
    return "\n".join(lines)


__all__ = ["render_selfcheck", "selfcheck"]
