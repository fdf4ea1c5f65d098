"""``sandbox-runner policy lint|explain|diff``: the policy bundle, for auditors.

Owns: the auditor-facing output of the policy bundle (text and ``--json``): the lint
report with its comparison to Docker's default seccomp profile, the explanation of
what a task (of one tenant, with ``--tenant``) may and may not do, and the
differences between two policies. The rules, the comparisons and the explanation
itself come from :mod:`runner.policy`. Registered in :mod:`runner.cli.app` with
``main.add_command``.

Exit codes: ``policy lint`` 0 when the bundle has no error (warnings are fine), 1
when it has; ``policy diff`` 0 when the two policies let a task do the same, 1 when
they differ (like diff(1)); 2 for usage, configuration or infrastructure errors (as
everywhere).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import click

from runner.cli import support
from runner.cli.support import EXIT_FINDINGS, report_json, wrap
from runner.policy import (
    ARCHES,
    DOCKER_DEFAULT_PROFILE,
    LintReport,
    PolicyBundle,
    PolicyDiff,
    diff_policies,
    explain_bundle,
    lint_bundle,
    parse_bundle,
)
from runner.settings import DATA_ROOT


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if machine else "x86_64"


def _bundle_dir(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    return support.settings().policy_dir


@click.group("policy")
def policy() -> None:
    """Check and explain a policy bundle (default: the configured one, policies/)."""


@policy.command("lint")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCHES)),
    default=None,
    help="Architecture of the Docker comparison (default: this host's).",
)
def policy_lint(directory: Path | None, as_json: bool, arch: str | None) -> None:
    """Reject a bundle that opens the container; compare its seccomp profile with Docker's.

    Errors: privileged, cap_add, host network/pid/ipc, host mounts, the Docker socket,
    a seccomp default action that allows, a non-native ABI, a required refusal that
    is allowed, clone/socket/personality without argument filters, a limit above
    its ceiling, an AppArmor profile that does not compile. Exit 1 on any error.
    """
    arch = arch or (_host_arch() if _host_arch() in ARCHES else "x86_64")
    report = lint_bundle(_bundle_dir(directory), arch=arch)
    click.echo(report_json(report.as_json()) if as_json else render_lint(report))
    if not report.is_ok:
        sys.exit(EXIT_FINDINGS)


@policy.command("explain")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@click.option(
    "--tenant",
    metavar="NAME",
    help="What this tenant's tasks may do: its profile (tenants/NAME.toml) over the defaults.",
)
def policy_explain(directory: Path | None, as_json: bool, tenant: str | None) -> None:
    """What a task may and may not do, read from the bundle's files."""
    bundle = _read_bundle(_bundle_dir(directory))
    document = explain_bundle(bundle, tenant)
    click.echo(report_json(document) if as_json else render_explain(document))


@policy.command("diff")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@click.option(
    "--tenant",
    "tenants",
    metavar="NAME",
    multiple=True,
    help="Compare this tenant's policy (once: the same tenant in both bundles; twice: the "
    "first tenant in A against the second in B, or in the one bundle).",
)
def policy_diff(bundles: tuple[Path, ...], as_json: bool, tenants: tuple[str, ...]) -> None:
    """Every difference between two policies that changes what a task may do.

    \b
    policy diff A B                          two bundles: everything, every tenant
    policy diff A B --tenant X               tenant X in A against tenant X in B
    policy diff [A] --tenant X --tenant Y    two tenants of one bundle (default: policies/)
    policy diff A B --tenant X --tenant Y    tenant X in A against tenant Y in B

    Each difference says whether B lets a task do more (wider), less (narrower) or
    something else (changed). Exit 0 when there is none, 1 when there are some.
    """
    if len(bundles) > 2 or len(tenants) > 2:
        support.fail("policy diff compares two policies: at most two bundles and two --tenant")
    if len(bundles) < 2 and len(tenants) < 2:
        support.fail(
            "policy diff needs two bundles (policy diff A B), or two tenants of one bundle "
            "(policy diff [A] --tenant X --tenant Y)"
        )
    directories = list(bundles) or [_bundle_dir(None)]
    a = _read_bundle(directories[0])
    b = a if len(directories) == 1 else _read_bundle(directories[1])
    tenant_a = tenants[0] if tenants else None
    tenant_b = tenants[-1] if tenants else None
    result = diff_policies(a, b, tenant_a=tenant_a, tenant_b=tenant_b)
    click.echo(report_json(result.as_json()) if as_json else render_diff(result))
    if not result.is_same:
        sys.exit(EXIT_FINDINGS)


def _read_bundle(directory: Path) -> PolicyBundle:
    # An auditor may read a bundle the linter rejects; only an unreadable one is an error.
    bundle, findings = parse_bundle(directory)
    if bundle is None:
        support.fail(f"cannot read the policy bundle {directory}: {findings[0]}")
    return bundle


# -- rendering --------------------------------------------------------------------------


def render_lint(report: LintReport) -> str:
    verdict = "OK" if report.is_ok else "REJECTED"
    sha = f" (sha256 {report.sha256})" if report.sha256 else ""
    lines = [
        f"policy lint {report.directory}: {verdict}: {len(report.errors)} error(s), "
        f"{len(report.warnings)} warning(s){sha}"
    ]
    for name, sha256 in report.tenants:
        lines.append(f"  tenant {name}: tenants/{name}.toml (sha256 {sha256})")
    for finding in report.findings:
        lines.append(
            wrap(
                f"{finding.file}: {finding.message}",
                " " * 10,
                f"{finding.severity.value:<8}  [{finding.rule}] ",
            )
        )
    comparison = report.comparison
    if comparison is None:
        return "\n".join(lines)
    lines += [
        "",
        f"Compared with Docker's default seccomp profile ({_relative(DOCKER_DEFAULT_PROFILE)}, "
        f"Docker 20.10), {comparison.arch}, no capabilities:",
        f"  system calls allowed: ours {comparison.ours_allowed}, Docker's default "
        f"{comparison.docker_allowed}",
    ]
    sections = (
        ("refused only by ours", comparison.refused_only_by_ours),
        (
            "narrowed by ours (both allow; ours only with these arguments)",
            comparison.narrowed_by_ours,
        ),
        ("allowed only by ours", comparison.allowed_only_by_ours),
        ("refused by both, answered differently", comparison.errno_differs),
    )
    for title, differences in sections:
        lines.append(f"  {title} ({len(differences)}){':' if differences else ': none'}")
        for difference in differences:
            if difference.ours_conditions:
                lines.append(f"    {difference.name:<22} Docker: {difference.docker}; ours only if")
                lines.extend(f"{' ' * 29}{condition}" for condition in difference.ours_conditions)
                continue
            lines.append(
                wrap(
                    f"ours: {difference.ours}; Docker: {difference.docker}",
                    " " * 27,
                    f"    {difference.name:<22} ",
                )
            )
    if comparison.docker_names_not_on_arch:
        names = " ".join(comparison.docker_names_not_on_arch)
        lines.append(
            f"  names in Docker's profile that are no {comparison.arch} system call "
            f"({len(comparison.docker_names_not_on_arch)}, other ABIs):"
        )
        lines.append(wrap(names, "    "))
    return "\n".join(lines)


def _render_tenant(tenant: dict[str, Any]) -> list[str]:
    if tenant["profile"] is None:
        return [
            "",
            f"TENANT {tenant['name']}: no profile (tenants/{tenant['name']}.toml): the defaults",
        ]
    quota = tenant["quota"] if tenant["quota"] is not None else "the broker's setting"
    return [
        "",
        f"TENANT {tenant['name']}: profile {tenant['profile']}",
        f"  sha256       {tenant['profileSha256']}",
        f"  sets         {', '.join(tenant['sets']) or 'nothing but what follows'}",
        f"  runtime      {tenant['runtime']}"
        + (
            " (only a runner on gVisor, runsc, runs its tasks)"
            if tenant["runtime"] == "gvisor"
            else ""
        ),
        f"  image        variant {tenant['imageVariant'] or 'none (the task image)'}",
        f"  quota        {quota} task(s) running at once",
    ]


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(DATA_ROOT))
    except ValueError:
        return str(path)


def render_diff(result: PolicyDiff) -> str:
    def named(side: dict[str, Any]) -> str:
        text = f"{side['bundle']} (sha256 {side['sha256']})"
        if "tenant" not in side:
            return text
        if side["profile"] is None:
            return f"{text}, tenant {side['tenant']} (no profile: the defaults)"
        return (
            f"{text}, tenant {side['tenant']} ({side['profile']}, sha256 {side['profileSha256']})"
        )

    count = len(result.differences)
    out = [
        f"a: {named(result.a)}",
        f"b: {named(result.b)}",
        f"{count} difference(s) that change what a task may do"
        if count
        else "no difference in what a task may do",
    ]
    scope = None
    for difference in result.differences:
        if difference.scope != scope:
            scope = difference.scope
            out.append(f"[{scope}]")
        out.append(
            wrap(
                f"{difference.key}: {difference.describe()}",
                " " * 14,
                f"  {difference.effect.value:<10}  ",
            )
        )
    return "\n".join(out)


def render_explain(doc: dict[str, Any]) -> str:
    out: list[str] = [
        f"Policy bundle {doc['bundle']}",
        f"  sha256 {doc['sha256']}",
        f"  over   {', '.join(doc['files'])}",
    ]
    tenant = doc.get("tenant")
    for name, sha256 in doc.get("tenants", {}).items():
        out.append(f"  tenant {name}: tenants/{name}.toml, sha256 {sha256}")
    if tenant is not None:
        out += _render_tenant(tenant)
    out += [
        "",
        "LIMITS per task (a setting may lower a value, never raise it above the ceiling)"
        if tenant is None
        else f"LIMITS per task of tenant {tenant['name']} (a task may ask for less, never "
        "more; * set by its profile)",
        f"  {'limit':<14} {'default' if tenant is None else 'tenant':>12} {'ceiling':>12}",
    ]
    sets = set(tenant["sets"]) if tenant is not None else set()
    for name, bound in doc["limits"].items():
        mark = " *" if f"limits.{name}" in sets else ""
        out.append(f"  {name:<14} {bound['default']:>12} {bound['ceiling']:>12}{mark}")

    c, image = doc["container"], doc["image"]
    tmpfs = ", ".join(f"{target} ({options})" for target, options in c["tmpfs"].items())
    out += [
        "",
        "CONTAINER (one per task, destroyed after it)",
        f"  runs as      uid {image['uid']} (image {image['repository']}), never root",
        f"  holds        {', '.join(image['pythonPackages']) or 'no third-party package'} "
        "(python_packages; pinned in python-packages.lock; imported only as external_allow says)",
        f"  preloads     {', '.join(image['preload']) or 'nothing'} in a warm slot's agent "
        "([image] preload; a task whose allowlist refuses one starts cold)",
        *(
            f"  variant      {name}: {', '.join(v['locked']) or 'no lock yet'} "
            f"(its image instead, for tenants naming it; python-packages.{name}.lock)"
            for name, v in image.get("variants", {}).items()
        ),
        f"  may          write only {tmpfs or 'nothing'}; size limits.tmpfs_mb",
        f"  may not      write the image (read-only root filesystem: {c['readOnlyRootfs']})",
        f"  may not      reach any network (network_mode {c['network']}: only lo)",
        f"  may not      hold a capability (cap_drop {' '.join(c['capDrop'])}; cap_add "
        f"{' '.join(c['capAdd']) or 'none'}; privileged {str(c['privileged']).lower()})",
        f"  may not      gain privileges through setuid files (no_new_privileges "
        f"{str(c['noNewPrivileges']).lower()})",
        f"  may not      see host processes, IPC or cgroups (pid {c['pidMode']}, ipc "
        f"{c['ipcMode']}, cgroupns {c['cgroupns']})",
        f"  may not      use host mounts or devices (mounts: {len(c['mounts']) or 'none'}, "
        f"devices: {len(c['devices']) or 'none'})",
    ]

    s = doc["seccomp"]
    allowed = sum(len(group["syscalls"]) for group in s["allowed"])
    out += [
        "",
        f"SYSTEM CALLS ({s['file']})",
        f"  sha256       {s['sha256']}",
        f"  default      everything not listed below is refused with {s['defaultAnswer']}",
        f"  ABIs         {', '.join(s['architectures'])} only; {s['foreignAbis']}",
        f"  may ({allowed} calls without conditions, by purpose):",
    ]
    for group in s["allowed"]:
        only = f" [{', '.join(group['only'])} only]" if "only" in group else ""
        out.append(wrap(group["why"] + only, "      ", "    - "))
        out.append(wrap(" ".join(group["syscalls"]), "        ", "      "))
    out.append("  may, with these arguments only:")
    for entry in s["allowedWithArguments"]:
        out.append(wrap(f"{' '.join(entry['syscalls'])} if {entry['when']}", "      ", "    - "))
        out.append(wrap(entry["why"], "        ", "      "))
    out.append("  may not (listed explicitly; the default refuses them too):")
    for entry in s["refusedExplicitly"]:
        out.append(wrap(f"{' '.join(entry['syscalls'])} -> {entry['answer']}", "      ", "    - "))
        out.append(wrap(entry["why"], "        ", "      "))

    a = doc["apparmor"]
    out += [
        "",
        f"APPARMOR ({a['file']}, profile {a['profile']})",
        "  applied where the host kernel has AppArmor; elsewhere reported as not available",
    ]
    for section in a["rules"]:
        out.append(wrap("; ".join(section["rules"]), "      ", f"  {section['section']}: "))

    i = doc["imports"]

    def listed(names: list[str]) -> str:
        return " ".join(names) if names else "none"

    def ceiling(names: list[str]) -> str:
        return "any module" if names == ["*"] else listed(names)

    out += [
        "",
        "IMPORTS AND BUILTINS (speed bumps in front of the container)",
        "  settings may change them within the bounds shown",
        wrap(listed(i["stdlibAllow"]), "      ", "  standard library allowed: "),
        f"      bound: {ceiling(i['stdlibAllowCeiling'])}",
        f"  third-party allowed: {listed(i['externalAllow'])}; bound: "
        f"{ceiling(i['externalAllowCeiling'])}",
        wrap(listed(i["builtinsDeny"]), "      ", "  builtins removed: "),
        f"      every setting must still remove: {listed(i['builtinsDenyFloor'])}",
    ]
    if tenant is not None:
        for kind in ("stdlib", "external"):
            if f"imports.{kind}_allow" in sets:
                out.append(f"  * {kind} allowlist set by the tenant's profile")

    sc = doc["selfcheck"]
    canary = sc["canary"]
    out += [
        "",
        "SELF-CHECK (canary containers prove these before the runner takes tasks)",
    ]
    for name in [*sc["required"], *sc["optional"]]:
        kind = "required" if name in sc["required"] else "optional"
        out.append(f"  {kind:<9} {name:<21} {sc['guarantees'][name]}")
    out.append(
        f"  canary limits: {canary['memoryMb']} MiB memory, {canary['pids']} pids, "
        f"{canary['timeoutS']:g} s"
    )
    return "\n".join(out)


__all__ = ["policy", "render_diff", "render_explain", "render_lint"]
