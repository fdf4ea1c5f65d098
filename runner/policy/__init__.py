"""The policy bundle in ``policies/``: load it, validate it, hash it, lint it, explain it.

Owns: the schema of ``sandbox.toml`` and of the seccomp profile (pydantic, frozen:
these files are a trust boundary, edited by people), the lint rules that keep a
bundle from opening the container, the sha256 of the bundle, and the merge with
:class:`~runner.settings.Settings` (settings may tighten the bundle, never loosen it
beyond its ceilings). It hands immutable objects down: :class:`PolicyBundle` (the
files, validated) and :class:`EffectivePolicy` (bundle + settings: the limits and
guards every task gets).

Every problem is a :class:`Finding` naming the file and the rule; loading stops at
start with a :class:`~runner.errors.ConfigurationError` built from the first
error, ``sandbox-runner policy lint`` shows them all.

Must not: read the environment (settings are passed in), import docker or the
sandbox implementations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner.analyzer import ImportPolicy, parse_allowlist
from runner.errors import ConfigurationError
from runner.policy.bundle import PolicyBundle, bundle_sha256, parse_bundle
from runner.policy.docker_default import (
    DOCKER_DEFAULT_PROFILE,
    DockerComparison,
    compare_with_docker,
    docker_default_profile,
)
from runner.policy.model import (
    GUARANTEES,
    LIMIT_FIELDS,
    POLICY_FILE,
    AppArmorSection,
    Finding,
    PolicyConfig,
    Severity,
    format_number,
    limit_minimum,
    wider_than,
)
from runner.policy.seccomp import (
    ARCHES,
    REQUIRED_REFUSALS,
    SeccompProfile,
    check_seccomp,
    errno_name,
    syscall_table,
)
from runner.sandbox.base import MAXIMUM_CODE_BYTES, MIB, MINIMUM_LIMITS, GuardConfig, Limits
from runner.settings import Settings, env_name

# -- what the linter insists on, whatever the bundle says ------------------------------

DOCKER_SOCKETS = ("docker.sock", "containerd.sock", "dockershim.sock", "crio.sock")
REQUIRED_TMPFS_OPTIONS = frozenset({"noexec", "nosuid", "nodev"})

#: Guarantees a bundle may list as optional (the host kernel may lack AppArmor).
MAY_BE_OPTIONAL = frozenset({"apparmor"})


def load_bundle(directory: Path, *, enforce: bool = True) -> PolicyBundle:
    """Load a bundle for use: any error stops here with the file and the rule.

    ``enforce=False`` keeps schema errors fatal but lets rule violations through (as
    warnings on the bundle): only for diagnosing a weakened bundle with ``selfcheck``,
    never for running tasks.
    """
    bundle, findings = parse_bundle(directory)
    if bundle is None:
        raise _configuration_error(directory, findings)
    findings = check_bundle(bundle)
    errors = [finding for finding in findings if finding.severity is Severity.ERROR]
    if errors and enforce:
        raise _configuration_error(directory, errors)
    if not enforce:
        findings = [_as_warning(finding) for finding in findings]
    return _with_warnings(bundle, findings)


def _with_warnings(bundle: PolicyBundle, findings: list[Finding]) -> PolicyBundle:
    return replace(bundle, warnings=tuple(findings))


def _as_warning(finding: Finding) -> Finding:
    return replace(finding, severity=Severity.WARNING)


def _configuration_error(directory: Path, findings: list[Finding]) -> ConfigurationError:
    first = findings[0]
    more = f"; {len(findings) - 1} more problem(s)" if len(findings) > 1 else ""
    return ConfigurationError(
        f"Invalid policy bundle {directory}: {first}",
        hint=f"run `sandbox-runner policy lint {directory}` for every finding{more}",
    )


# -- lint rules -------------------------------------------------------------------------


def check_bundle(bundle: PolicyBundle) -> list[Finding]:
    """Every rule violation of a parsed bundle (errors and warnings)."""
    return [
        *_check_limits(bundle.config),
        *_check_image(bundle.config),
        *_check_imports(bundle.config),
        *_check_container(bundle.config),
        *_check_selfcheck(bundle.config),
        *check_seccomp(bundle.config.seccomp.profile, bundle.seccomp),
        *_check_apparmor(bundle.config.apparmor, bundle.apparmor_text),
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


@dataclass(frozen=True, slots=True)
class LintReport:
    directory: Path
    sha256: str | None
    findings: tuple[Finding, ...]
    comparison: DockerComparison | None

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
    return LintReport(directory, bundle.sha256, tuple(findings), comparison)


# -- explain ----------------------------------------------------------------------------


APPARMOR_SECTION = re.compile(r"^\s*#\s*-{2,}\s*(.+?)\s*-{2,}\s*$")


def apparmor_rules(text: str) -> list[tuple[str, list[str]]]:
    """The profile's rules, grouped under its ``# ---- section ----`` comments."""
    sections: list[tuple[str, list[str]]] = []
    inside = False
    for line in text.splitlines():
        header = APPARMOR_SECTION.match(line)
        if header and inside:
            sections.append((header.group(1), []))
            continue
        stripped = line.split("#", 1)[0].strip() if not line.strip().startswith("#") else ""
        if not stripped:
            continue
        if stripped.startswith("profile ") and stripped.endswith("{"):
            inside = True
            sections.append(("profile", []))
            continue
        if stripped == "}":
            inside = False
            continue
        if inside:
            sections[-1][1].append(stripped.rstrip(","))
    return [(title, rules) for title, rules in sections if rules]


def explain_bundle(bundle: PolicyBundle) -> dict[str, Any]:
    """What a task may and may not do, read from the bundle's files (JSON-ready)."""
    config = bundle.config
    c = config.container
    minimums = {bound_name: limit_minimum(bound_name) for _, bound_name, _, _ in LIMIT_FIELDS}
    limits = {
        name: {"default": bound.default, "ceiling": bound.ceiling, "minimum": minimums[name]}
        for name, bound in config.limits.bounds().items()
    }
    groups_allowed: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for rule in bundle.seccomp.syscalls:
        go_arches = [go for _, go in ARCHES.values() if rule.applies(go)]
        entry: dict[str, Any] = {"syscalls": list(rule.names), "why": rule.comment}
        if len(go_arches) < len(ARCHES):
            entry["only"] = go_arches
        if rule.action == "SCMP_ACT_ALLOW" and not rule.args:
            groups_allowed.append(entry)
        elif rule.action == "SCMP_ACT_ALLOW":
            entry["when"] = " and ".join(arg.describe() for arg in rule.args or ())
            filtered.append(entry)
        else:
            errno = rule.errnoRet if rule.errnoRet is not None else 1
            entry["answer"] = errno_name(errno) if rule.action == "SCMP_ACT_ERRNO" else rule.action
            refused.append(entry)
    native = [entry.architecture for entry in bundle.seccomp.archMap or ()]
    return {
        "bundle": str(bundle.directory),
        "sha256": bundle.sha256,
        "files": list(bundle.files),
        "limits": limits,
        "image": {"repository": config.image.repository, "uid": config.image.uid},
        "container": {
            "network": c.network_mode,
            "readOnlyRootfs": c.read_only_rootfs,
            "privileged": c.privileged,
            "capDrop": list(c.cap_drop),
            "capAdd": list(c.cap_add),
            "noNewPrivileges": c.no_new_privileges,
            "pidMode": c.pid_mode,
            "ipcMode": c.ipc_mode,
            "cgroupns": c.cgroupns,
            "mounts": [m.model_dump() for m in c.mounts],
            "devices": list(c.devices),
            "tmpfs": dict(c.tmpfs),
        },
        "imports": {
            "stdlibAllow": list(config.imports.stdlib_allow),
            "stdlibAllowCeiling": list(config.imports.stdlib_allow_ceiling),
            "externalAllow": list(config.imports.external_allow),
            "externalAllowCeiling": list(config.imports.external_allow_ceiling),
            "builtinsDeny": list(config.imports.builtins_deny),
            "builtinsDenyFloor": list(config.imports.builtins_deny_floor),
        },
        "seccomp": {
            "file": config.seccomp.profile,
            "sha256": bundle.seccomp_sha256,
            "defaultAction": bundle.seccomp.defaultAction,
            "defaultAnswer": errno_name(bundle.seccomp.default_errno())
            if bundle.seccomp.default_errno()
            else bundle.seccomp.defaultAction,
            "architectures": native,
            "foreignAbis": "killed (SIGSYS): not in the filter",
            "allowed": groups_allowed,
            "allowedWithArguments": filtered,
            "refusedExplicitly": refused,
        },
        "apparmor": {
            "file": config.apparmor.file,
            "profile": config.apparmor.profile,
            "rules": [
                {"section": title, "rules": rules}
                for title, rules in apparmor_rules(bundle.apparmor_text)
            ],
        },
        "selfcheck": {
            "required": list(config.selfcheck.required),
            "optional": list(config.selfcheck.optional),
            "guarantees": {
                name: GUARANTEES.get(name, "?")
                for name in (*config.selfcheck.required, *config.selfcheck.optional)
            },
            "canary": {
                "memoryMb": config.selfcheck.canary_memory_mb,
                "pids": config.selfcheck.canary_pids,
                "timeoutS": config.selfcheck.canary_timeout_s,
            },
        },
    }


# -- bundle + settings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The bundle with the settings applied: what every task of this runner gets."""

    bundle: PolicyBundle
    limits: Limits
    import_policy: ImportPolicy
    guards: GuardConfig
    apparmor_profile: str
    tightened: tuple[str, ...] = field(default=())  # the settings that changed a default

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @property
    def user(self) -> str:
        uid = self.bundle.config.image.uid
        return f"{uid}:{uid}"

    def canary_limits(self) -> Limits:
        """The self-check canary's limits: small memory and pids so that both bite fast."""
        selfcheck = self.bundle.config.selfcheck
        return replace(
            self.limits,
            timeout_s=selfcheck.canary_timeout_s,
            memory_bytes=selfcheck.canary_memory_mb * MIB,
            pids=selfcheck.canary_pids,
        )

    def check_timeout(self, timeout_s: float, source: str) -> float:
        """A per-run timeout (``--timeout``) must stay between the minimum and the ceiling."""
        ceiling = self.bundle.config.limits.timeout_s.ceiling
        if timeout_s > ceiling:
            raise _above_ceiling(
                source, timeout_s, "[limits] timeout_s", ceiling, self.bundle.directory
            )
        if not timeout_s >= MINIMUM_LIMITS.timeout_s:  # NaN too
            raise ConfigurationError(
                f"{source}={format_number(timeout_s)} is below the minimum timeout of "
                f"{format_number(MINIMUM_LIMITS.timeout_s)} s",
                hint="a limit below its minimum is refused everywhere (policies/README.md 3.1)",
            )
        return timeout_s


def _above_ceiling(
    source: str, value: object, key: str, ceiling: object, directory: Path
) -> ConfigurationError:
    return ConfigurationError(
        f"{source}={format_number(value)} is above the policy ceiling {key} = "
        f"{format_number(ceiling)} ({directory / POLICY_FILE})",
        hint="settings may only tighten the policy bundle; raise the ceiling in a reviewed "
        "change of the bundle instead",
    )


def resolve_policy(bundle: PolicyBundle, settings: Settings) -> EffectivePolicy:
    """Apply settings to the bundle: tighter is fine, beyond a ceiling is an error."""
    config, tightened = bundle.config, []
    limit_values: dict[str, Any] = {}
    for setting, bound_name, factor, limits_field in LIMIT_FIELDS:
        bound = getattr(config.limits, bound_name)
        value = getattr(settings, setting)
        if value is None:
            value = bound.default
        else:
            if value > bound.ceiling:
                raise _above_ceiling(
                    env_name(setting),
                    value,
                    f"[limits] {bound_name}",
                    bound.ceiling,
                    bundle.directory,
                )
            tightened.append(setting)
        limit_values[limits_field] = value * factor if factor != 1 else value

    imports = config.imports
    stdlib = _allowlist(
        settings.stdlib_allow,
        imports.stdlib_allow,
        imports.stdlib_allow_ceiling,
        env_name("stdlib_allow"),
        "stdlib_allow_ceiling",
        bundle.directory,
    )
    external = _allowlist(
        settings.external_allow,
        imports.external_allow,
        imports.external_allow_ceiling,
        env_name("external_allow"),
        "external_allow_ceiling",
        bundle.directory,
    )
    if settings.builtins_deny is None:
        deny = tuple(sorted(set(imports.builtins_deny)))
    else:
        # n8n splits on "," and trims; an empty string denies nothing.
        deny = tuple(sorted({name.strip() for name in settings.builtins_deny.split(",")} - {""}))
        missing = sorted(set(imports.builtins_deny_floor) - set(deny))
        if missing:
            raise ConfigurationError(
                f"{env_name('builtins_deny')} must still deny {', '.join(missing)} "
                f"(builtins_deny_floor in {bundle.directory / POLICY_FILE})",
                hint="settings may only tighten the policy bundle",
            )
    for setting in ("stdlib_allow", "external_allow", "builtins_deny"):
        if getattr(settings, setting) is not None:
            tightened.append(setting)
    limits = Limits(**limit_values)
    below = limits.below_minimum()
    if below:
        # Settings cannot get here (their fields carry the same floors); a bundle loaded
        # with enforce=False can. Never run a task under a limit that means "none".
        raise ConfigurationError(
            f"Limits below their minimum ({bundle.directory / POLICY_FILE} or settings): "
            + ", ".join(below),
            hint="a limit below its minimum is refused everywhere (policies/README.md 3.1)",
        )
    import_policy = ImportPolicy(stdlib, external)
    guards = GuardConfig(
        stdlib_allow=tuple(sorted(stdlib)),
        external_allow=tuple(sorted(external)),
        builtins_deny=deny,
        block_env_access=settings.block_env_access,
        max_print_calls=settings.max_print_calls,
    )
    return EffectivePolicy(
        bundle=bundle,
        limits=limits,
        import_policy=import_policy,
        guards=guards,
        apparmor_profile=settings.apparmor_profile or config.apparmor.profile,
        tightened=tuple(tightened),
    )


def _allowlist(
    raw: str | None,
    default: tuple[str, ...],
    ceiling: tuple[str, ...],
    variable: str,
    ceiling_key: str,
    directory: Path,
) -> frozenset[str]:
    if raw is None:
        return frozenset(default)
    entries = parse_allowlist(raw, variable)
    wider = wider_than(entries, frozenset(ceiling))
    if wider:
        raise ConfigurationError(
            f"{variable} allows {', '.join(wider)}, beyond the policy's {ceiling_key} "
            f"({directory / POLICY_FILE})",
            hint="settings may only tighten the policy bundle",
        )
    return entries


def load_policy(settings: Settings, *, enforce: bool = True) -> EffectivePolicy:
    """The bundle at ``settings.policy_dir`` with the settings applied."""
    return resolve_policy(load_bundle(settings.policy_dir, enforce=enforce), settings)


__all__ = [
    "ARCHES",
    "DOCKER_DEFAULT_PROFILE",
    "GUARANTEES",
    "MAY_BE_OPTIONAL",
    "POLICY_FILE",
    "REQUIRED_REFUSALS",
    "DockerComparison",
    "EffectivePolicy",
    "Finding",
    "LintReport",
    "PolicyBundle",
    "PolicyConfig",
    "SeccompProfile",
    "Severity",
    "bundle_sha256",
    "check_bundle",
    "compare_with_docker",
    "docker_default_profile",
    "explain_bundle",
    "lint_bundle",
    "load_bundle",
    "load_policy",
    "parse_bundle",
    "resolve_policy",
    "syscall_table",
]
