"""The rules that keep a bundle from opening the container, and the lint report.

Owns: :func:`check_bundle` (every rule on a parsed bundle: limits within their
ceilings and above their floors, a non-root uid, import allowlists within their
ceilings, a closed ``[container]``, the self-check's guarantees, the seccomp rules of
:mod:`runner.policy.seccomp`, the AppArmor profile's name, and every tenant profile
against the ceilings by the rules of :mod:`runner.policy.tenant`), the AppArmor compile check
(``apparmor_parser``, the only program this package runs), and :func:`lint_bundle` /
:class:`LintReport`: all of it plus the comparison with Docker's default profile, as
``sandbox-runner policy lint`` prints it. What the rules insist on lives here in code,
not in the bundle: a bundle must not be able to weaken its own linter.

Must not import: the explain or effective modules of this package,
:mod:`runner.settings` (the rules judge files, never settings), docker or the sandbox
implementations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.analyzer import parse_allowlist
from runner.policy.bundle import PolicyBundle, parse_bundle
from runner.policy.docker_default import (
    DockerComparison,
    compare_with_docker,
    docker_default_profile,
)
from runner.policy.model import (
    GUARANTEES,
    LIMIT_FIELDS,
    PACKAGE_LOCK_FILE,
    POLICY_FILE,
    AppArmorSection,
    Finding,
    PolicyConfig,
    Severity,
    format_number,
    limit_minimum,
    wider_than,
)
from runner.policy.seccomp import check_seccomp
from runner.policy.tenant import check_tenant
from runner.sandbox.base import MAXIMUM_CODE_BYTES, MIB, MINIMUM_LIMITS

# -- what the linter insists on, whatever the bundle says ------------------------------
# These live in code on purpose: a bundle must not be able to weaken its own linter.

DOCKER_SOCKETS = ("docker.sock", "containerd.sock", "dockershim.sock", "crio.sock")
REQUIRED_TMPFS_OPTIONS = frozenset({"noexec", "nosuid", "nodev"})
#: Guarantees a bundle may list as optional (the host kernel may lack AppArmor).
MAY_BE_OPTIONAL = frozenset({"apparmor"})


# -- lint rules -------------------------------------------------------------------------


def check_bundle(bundle: PolicyBundle) -> list[Finding]:
    """Every rule violation of a parsed bundle (errors and warnings)."""
    return [
        *_check_limits(bundle.config),
        *_check_image(bundle.config),
        *_check_preload(bundle),
        *_check_installed(bundle),
        *_check_imports(bundle.config),
        *_check_container(bundle.config),
        *_check_selfcheck(bundle.config),
        *check_seccomp(bundle.config.seccomp.profile, bundle.seccomp),
        *_check_apparmor(bundle.config.apparmor, bundle.apparmor_text),
        # Each tenant profile against the ceilings of this bundle (runner.policy.tenant).
        *(
            finding
            for profile in bundle.tenants.values()
            for finding in check_tenant(profile, bundle.config)
        ),
    ]


def _check_limits(config: PolicyConfig) -> list[Finding]:
    findings = []
    for name, bound in config.limits.bounds().items():
        if bound.default > bound.ceiling:
            findings.append(
                Finding(
                    "limits.above-ceiling",
                    POLICY_FILE,
                    f"[limits] {name}: default {bound.default} is above its ceiling "
                    f"{bound.ceiling}",
                )
            )
    # Floors in code (runner.sandbox.base.MINIMUM_LIMITS): a bundle cannot lower them.
    # Below them a limit can round to nothing (cpus 1e-10 -> NanoCpus 0 -> unlimited).
    for _, bound_name, _, _ in LIMIT_FIELDS:
        bound, minimum = getattr(config.limits, bound_name), limit_minimum(bound_name)
        for which in ("default", "ceiling"):
            value = getattr(bound, which)
            if value < minimum:
                findings.append(
                    Finding(
                        "limits.below-minimum",
                        POLICY_FILE,
                        f"[limits] {bound_name}.{which} = {format_number(value)} is below the "
                        f"minimum {format_number(minimum)} (a limit that rounds to nothing is "
                        "no limit)",
                    )
                )
    if config.limits.code_bytes.ceiling > MAXIMUM_CODE_BYTES:
        findings.append(
            Finding(
                "limits.above-maximum",
                POLICY_FILE,
                f"[limits] code_bytes.ceiling = {config.limits.code_bytes.ceiling} is above "
                f"the most the runner parses, {MAXIMUM_CODE_BYTES} bytes (parsing costs ~500 "
                "bytes of memory and ~3 us of CPU per byte)",
            )
        )
    selfcheck, limits = config.selfcheck, config.limits
    for name, value, bound, minimum in (
        (
            "canary_memory_mb",
            selfcheck.canary_memory_mb,
            limits.memory_mb,
            MINIMUM_LIMITS.memory_bytes // MIB,
        ),
        ("canary_pids", selfcheck.canary_pids, limits.pids, MINIMUM_LIMITS.pids),
        (
            "canary_timeout_s",
            selfcheck.canary_timeout_s,
            limits.timeout_s,
            MINIMUM_LIMITS.timeout_s,
        ),
    ):
        if value > bound.ceiling:
            findings.append(
                Finding(
                    "limits.above-ceiling",
                    POLICY_FILE,
                    f"[selfcheck] {name} = {value} is above the ceiling {bound.ceiling}",
                )
            )
        if value < minimum:
            findings.append(
                Finding(
                    "limits.below-minimum",
                    POLICY_FILE,
                    f"[selfcheck] {name} = {value} is below the minimum {format_number(minimum)}",
                )
            )
    return findings


def _check_image(config: PolicyConfig) -> list[Finding]:
    if config.image.uid == 0:
        return [Finding("image.root", POLICY_FILE, "[image] uid = 0: tasks must never run as root")]
    return []


def _check_preload(bundle: PolicyBundle) -> list[Finding]:
    """[image] preload: each module the lock provides and external_allow allows.

    A warm pool slot imports these before it knows whose task it will get, so a tenant
    whose profile does not allow one never gets such a slot (its tasks start cold: the
    runner refuses the hand-over, runner.sandbox.container); that is worth a warning.
    """
    config, findings = bundle.config, []
    preload = config.image.preload
    unlocked = sorted(name for name in preload if name not in bundle.lock_provides)
    if unlocked:
        findings.append(
            Finding(
                "image.preload-not-locked",
                POLICY_FILE,
                f"[image] preload names {', '.join(unlocked)}, which no package of "
                f"{PACKAGE_LOCK_FILE} provides (a preload is a locked third-party package)",
            )
        )
    allowed = frozenset(config.imports.external_allow)
    refused = sorted(name for name in preload if "*" not in allowed and name not in allowed)
    if refused:
        findings.append(
            Finding(
                "image.preload-not-allowed",
                POLICY_FILE,
                f"[image] preload names {', '.join(refused)}, which [imports] external_allow "
                "does not allow: a slot must not hold a module its tasks may not import",
            )
        )
    for profile in bundle.tenants.values():
        own = profile.config.imports.external_allow
        if own is None or "*" in own or profile.config.image_variant is not None:
            continue  # a variant's tasks never take a warm slot: nothing to warn of
        narrower = sorted(name for name in preload if name not in own)
        if narrower:
            findings.append(
                Finding(
                    "tenant.preload-not-allowed",
                    profile.file,
                    f"[imports] external_allow does not allow the preloaded "
                    f"{', '.join(narrower)}: this tenant's tasks never take a preloaded "
                    "warm slot and start cold",
                    Severity.WARNING,
                )
            )
    return findings


def _check_installed(bundle: PolicyBundle) -> list[Finding]:
    """external_allow naming a module the image its tasks run on does not hold.

    Harmless (the import fails in the container, "No module named ..."), but it is a
    typo or a package missing from python_packages: an auditor reading the allowlist
    should see what the image really lets a task import. Per tenant, against its own
    image (its variant's lock, else the default lock). ``*`` names nothing.
    """
    config, findings = bundle.config, []

    def missing(allowed: Iterable[str], provides: frozenset[str]) -> list[str]:
        names = frozenset(allowed)
        return [] if "*" in names else sorted(names - provides)

    absent = missing(config.imports.external_allow, bundle.lock_provides)
    if absent:
        findings.append(
            Finding(
                "imports.external-not-installed",
                POLICY_FILE,
                f"[imports] external_allow names {', '.join(absent)}, which no package of "
                f"the task image provides ({PACKAGE_LOCK_FILE}): its import fails",
                Severity.WARNING,
            )
        )
    for profile in bundle.tenants.values():
        own, variant = profile.config.imports.external_allow, profile.config.image_variant
        if own is None and variant is None:
            continue  # the defaults, on the default image: reported above
        if variant is not None and variant not in bundle.variant_provides:
            continue  # tenant.image-variant-unknown says it
        provides = bundle.lock_provides if variant is None else bundle.variant_provides[variant]
        absent = missing(own if own is not None else config.imports.external_allow, provides)
        if absent:
            image = "the task image" if variant is None else f"its image variant {variant}"
            findings.append(
                Finding(
                    "imports.external-not-installed",
                    profile.file,
                    f"[imports] external_allow names {', '.join(absent)}, which no package "
                    f"of {image} provides: its import fails",
                    Severity.WARNING,
                )
            )
    return findings


def _check_imports(config: PolicyConfig) -> list[Finding]:
    imports, findings = config.imports, []
    for kind in ("stdlib", "external"):
        default = getattr(imports, f"{kind}_allow")
        ceiling = getattr(imports, f"{kind}_allow_ceiling")
        for key, entries in ((f"{kind}_allow", default), (f"{kind}_allow_ceiling", ceiling)):
            try:
                parse_allowlist(",".join(entries), f"[imports] {key}")
            except ValueError as exc:
                findings.append(Finding("imports.wildcard", POLICY_FILE, str(exc)))
        wider = wider_than(frozenset(default), frozenset(ceiling))
        if wider:
            findings.append(
                Finding(
                    "imports.above-ceiling",
                    POLICY_FILE,
                    f"[imports] {kind}_allow allows {', '.join(wider)}, beyond "
                    f"{kind}_allow_ceiling",
                )
            )
    unknown = sorted(
        name
        for name in (*imports.stdlib_allow, *imports.stdlib_allow_ceiling)
        if name != "*" and name not in sys.stdlib_module_names
    )
    if unknown:
        findings.append(
            Finding(
                "imports.unknown-module",
                POLICY_FILE,
                f"[imports] not standard-library modules: {', '.join(unknown)}",
                Severity.WARNING,
            )
        )
    missing = sorted(set(imports.builtins_deny_floor) - set(imports.builtins_deny))
    if missing:
        findings.append(
            Finding(
                "imports.builtins-floor",
                POLICY_FILE,
                f"[imports] builtins_deny misses {', '.join(missing)} of builtins_deny_floor",
            )
        )
    return findings


def _check_container(config: PolicyConfig) -> list[Finding]:
    c, findings = config.container, []

    def error(rule: str, message: str) -> None:
        findings.append(Finding(rule, POLICY_FILE, f"[container] {message}"))

    if c.privileged:
        error(
            "container.privileged", "privileged = true gives the task every device and capability"
        )
    if c.cap_add:
        error("container.cap-add", f"cap_add = {list(c.cap_add)}: no capability may be added")
    if "ALL" not in {cap.upper() for cap in c.cap_drop}:
        error("container.cap-drop", 'cap_drop must contain "ALL"')
    if c.network_mode == "host":
        error("container.host-network", 'network_mode = "host" shares the host\'s network')
    elif c.network_mode != "none":
        error("container.network", f'network_mode = {c.network_mode!r}: must be "none"')
    if c.pid_mode == "host" or c.pid_mode.startswith("container:"):
        error("container.host-pid", f"pid_mode = {c.pid_mode!r} shares a pid namespace")
    elif c.pid_mode != "private":
        error("container.pid", f'pid_mode = {c.pid_mode!r}: must be "private"')
    if c.ipc_mode == "host" or c.ipc_mode.startswith("container:") or c.ipc_mode == "shareable":
        error("container.host-ipc", f"ipc_mode = {c.ipc_mode!r} shares IPC")
    elif c.ipc_mode not in ("none", "private"):
        error("container.ipc", f'ipc_mode = {c.ipc_mode!r}: must be "none" or "private"')
    if c.cgroupns != "private":
        error("container.host-cgroupns", f'cgroupns = {c.cgroupns!r}: must be "private"')
    if not c.read_only_rootfs:
        error("container.read-only-rootfs", "read_only_rootfs must be true")
    if not c.no_new_privileges:
        error("container.no-new-privileges", "no_new_privileges must be true")
    for mount in c.mounts:
        where = f"{mount.source or '?'} -> {mount.target}"
        if any(sock in f"{mount.source} {mount.target}" for sock in DOCKER_SOCKETS):
            error("container.docker-socket", f"mount {where}: the Docker socket, never")
        elif mount.type in ("bind", "volume", "npipe"):
            error("container.host-mount", f"mount {where} ({mount.type}): no host mounts")
        elif mount.type != "tmpfs":
            error("container.host-mount", f"mount {where}: unknown mount type {mount.type!r}")
    if c.devices:
        error("container.devices", f"devices = {list(c.devices)}: no host devices")
    for target, options in c.tmpfs.items():
        missing = sorted(REQUIRED_TMPFS_OPTIONS - {opt.strip() for opt in options.split(",")})
        if missing:
            error("container.tmpfs-options", f"tmpfs {target} lacks {', '.join(missing)}")
        if any(sock in target for sock in DOCKER_SOCKETS):
            error("container.docker-socket", f"tmpfs {target}: the Docker socket path")
    return findings


def _check_selfcheck(config: PolicyConfig) -> list[Finding]:
    s, findings = config.selfcheck, []
    listed = [*s.required, *s.optional]
    for name in sorted(set(listed) - set(GUARANTEES)):
        findings.append(
            Finding("selfcheck.unknown", POLICY_FILE, f"[selfcheck] unknown guarantee {name!r}")
        )
    for name in sorted(set(s.required) & set(s.optional)):
        findings.append(
            Finding("selfcheck.both", POLICY_FILE, f"[selfcheck] {name} is required and optional")
        )
    for name in [g for g in GUARANTEES if g not in listed]:
        findings.append(
            Finding("selfcheck.missing", POLICY_FILE, f"[selfcheck] {name} is not listed")
        )
    for name in sorted(set(s.optional) - MAY_BE_OPTIONAL):
        if name in GUARANTEES:
            findings.append(
                Finding(
                    "selfcheck.must-be-required",
                    POLICY_FILE,
                    f"[selfcheck] {name} must be required (only "
                    f"{', '.join(sorted(MAY_BE_OPTIONAL))} may be optional)",
                )
            )
    return findings


APPARMOR_PROFILE = re.compile(r"^\s*profile\s+(\S+)", re.M)


def _check_apparmor(section: AppArmorSection, text: str) -> list[Finding]:
    names = APPARMOR_PROFILE.findall(text)
    if section.profile not in names:
        declared = ", ".join(names) or "none"
        return [
            Finding(
                "apparmor.profile-name",
                section.file,
                f"declares profile(s) {declared}, not {section.profile!r} ([apparmor] profile)",
            )
        ]
    return []


def compile_apparmor(bundle: PolicyBundle) -> Finding | None:
    """``apparmor_parser -Q -K -T`` (compile only, no kernel needed); None when it compiles.

    A missing parser is a warning: the profile is an optional layer.
    """
    parser = shutil.which("apparmor_parser") or (
        "/usr/sbin/apparmor_parser" if Path("/usr/sbin/apparmor_parser").exists() else None
    )
    file = bundle.config.apparmor.file
    if parser is None:
        return Finding(
            "apparmor.compile",
            file,
            "apparmor_parser is not installed: not compiled",
            Severity.WARNING,
        )
    done = subprocess.run(
        [parser, "-Q", "-K", "-T", str(bundle.apparmor_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return Finding("apparmor.compile", file, f"apparmor_parser failed: {' | '.join(detail)}")
    return None


# -- the report -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LintReport:
    directory: Path
    sha256: str | None
    findings: tuple[Finding, ...]
    comparison: DockerComparison | None
    tenants: tuple[tuple[str, str], ...] = ()  # (tenant, its profile's sha256), by name

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def is_ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.directory),
            "sha256": self.sha256,
            "tenants": dict(self.tenants),
            "ok": self.is_ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [finding.as_json() for finding in self.findings],
            "comparedWithDockerDefault": self.comparison.as_json() if self.comparison else None,
        }


def lint_bundle(directory: Path, *, arch: str = "x86_64") -> LintReport:
    """Every finding of a bundle, its AppArmor compile check, and the Docker comparison."""
    bundle, findings = parse_bundle(directory)
    if bundle is None:
        return LintReport(directory, None, tuple(findings), None)
    findings = check_bundle(bundle)
    compiled = compile_apparmor(bundle)
    if compiled is not None:
        findings.append(compiled)
    comparison = compare_with_docker(bundle.seccomp, docker_default_profile(), arch)
    for difference in comparison.allowed_only_by_ours:
        findings.append(
            Finding(
                "seccomp.beyond-docker",
                bundle.config.seccomp.profile,
                f"{difference.name} is {difference.ours} here but refused by Docker's default",
                Severity.WARNING,
            )
        )
    order = {Severity.ERROR: 0, Severity.WARNING: 1}
    findings.sort(key=lambda f: (order[f.severity], f.file, f.rule, f.message))
    tenants = tuple((name, bundle.tenants[name].sha256) for name in sorted(bundle.tenants))
    return LintReport(directory, bundle.sha256, tuple(findings), comparison, tenants)
