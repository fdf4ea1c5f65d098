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

import errno as errno_module
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import Field, ValidationError, field_validator

from runner.analyzer import ImportPolicy, parse_allowlist
from runner.errors import ConfigurationError
from runner.policy.model import (
    GUARANTEES,
    LIMIT_FIELDS,
    POLICY_FILE,
    AppArmorSection,
    Finding,
    FrozenModel,
    PolicyConfig,
    Severity,
    format_number,
    limit_minimum,
    limits_of,
    wider_than,
)
from runner.sandbox.base import MAXIMUM_CODE_BYTES, MIB, MINIMUM_LIMITS, GuardConfig, Limits
from runner.settings import DATA_ROOT, Settings, env_name

REFERENCE_DIR = DATA_ROOT / "policies" / "reference"
DOCKER_DEFAULT_PROFILE = REFERENCE_DIR / "docker-default-seccomp.json"
SYSCALL_TABLE = REFERENCE_DIR / "syscalls.json"

# -- what the linter insists on, whatever the bundle says ------------------------------
# These live in code on purpose: a bundle must not be able to weaken its own linter.

#: System calls issue 4 requires the profile to refuse (policies/README.md 1.6).
REQUIRED_REFUSALS: tuple[str, ...] = (
    # io_uring, keyrings, userfaultfd, BPF and perf
    *("io_uring_setup", "io_uring_enter", "io_uring_register"),
    *("keyctl", "add_key", "request_key", "userfaultfd", "bpf", "perf_event_open"),
    # other processes
    *("ptrace", "process_vm_readv", "process_vm_writev", "kcmp"),
    # mounts, the new mount API, the root, namespaces, file handles
    *("mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount"),
    *("open_tree", "mount_setattr", "pivot_root", "chroot", "unshare", "setns"),
    "open_by_handle_at",
    # the host kernel: kexec, modules, reboot, swap, accounting, quotas, clocks
    *("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module"),
    *("reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd"),
    *("clock_settime", "settimeofday", "clock_adjtime", "adjtimex"),
)
#: Allowed only with argument filters (namespace flags, families, personas).
MUST_BE_FILTERED: tuple[str, ...] = ("clone", "socket", "socketpair", "personality")
#: The namespace flags ``clone`` must never be allowed with (Docker's mask).
CLONE_NAMESPACE_MASK = 0x7E020000
ENOSYS = 38
REFUSING_ACTIONS = frozenset(
    {"SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS"}
    | {"SCMP_ACT_TRAP"}
)
SECCOMP_ACTIONS = REFUSING_ACTIONS | {
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_NOTIFY",
}
SECCOMP_OPS = frozenset(
    {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE"}
    | {"SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"}
)
#: Native architectures the runner supports: libseccomp name and Docker's (Go) name.
ARCHES: Mapping[str, tuple[str, str]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
}
DOCKER_SOCKETS = ("docker.sock", "containerd.sock", "dockershim.sock", "crio.sock")
REQUIRED_TMPFS_OPTIONS = frozenset({"noexec", "nosuid", "nodev"})

#: Guarantees a bundle may list as optional (the host kernel may lack AppArmor).
MAY_BE_OPTIONAL = frozenset({"apparmor"})


# -- seccomp profile schema (Docker's JSON format) -------------------------------------


class SeccompFilter(FrozenModel):
    caps: tuple[str, ...] | None = None
    arches: tuple[str, ...] | None = None
    minKernel: str | None = None


class SeccompArg(FrozenModel):
    index: int = Field(ge=0, le=5)
    value: int = Field(ge=0)
    valueTwo: int = Field(0, ge=0)
    op: str

    @field_validator("op")
    @classmethod
    def _known_op(cls, value: str) -> str:
        if value not in SECCOMP_OPS:
            raise ValueError(f"unknown comparison {value!r}")
        return value

    def describe(self) -> str:
        arg = f"arg{self.index}"
        if self.op == "SCMP_CMP_MASKED_EQ":
            return f"{arg} & {self.value:#x} == {self.valueTwo:#x}"
        symbol = {
            "SCMP_CMP_NE": "!=",
            "SCMP_CMP_LT": "<",
            "SCMP_CMP_LE": "<=",
            "SCMP_CMP_EQ": "==",
            "SCMP_CMP_GE": ">=",
            "SCMP_CMP_GT": ">",
        }[self.op]
        return f"{arg} {symbol} {self.value:#x}"


class SeccompRule(FrozenModel):
    names: tuple[str, ...] = Field(min_length=1)
    action: str
    errnoRet: int | None = Field(None, ge=0, le=4095)
    args: tuple[SeccompArg, ...] | None = None
    comment: str = ""
    includes: SeccompFilter | None = None
    excludes: SeccompFilter | None = None

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        if value not in SECCOMP_ACTIONS:
            raise ValueError(f"unknown action {value!r}")
        return value

    def applies(self, go_arch: str, caps: frozenset[str] = frozenset()) -> bool:
        """Whether Docker keeps this rule for a container of ``go_arch`` with ``caps``."""
        inc, exc = self.includes, self.excludes
        if inc is not None:
            if inc.arches and go_arch not in inc.arches:
                return False
            if inc.caps and not set(inc.caps) <= caps:
                return False
        if exc is not None:
            if exc.arches and go_arch in exc.arches:
                return False
            if exc.caps and set(exc.caps) & caps:
                return False
        return True  # minKernel: every supported kernel is newer than any rule's minimum


class ArchMapEntry(FrozenModel):
    architecture: str
    subArchitectures: tuple[str, ...] | None = None


class SeccompProfile(FrozenModel):
    """A seccomp profile in Docker's JSON format, validated."""

    defaultAction: str
    defaultErrnoRet: int | None = None
    archMap: tuple[ArchMapEntry, ...] | None = None
    architectures: tuple[str, ...] | None = None
    syscalls: tuple[SeccompRule, ...] = ()

    @field_validator("defaultAction")
    @classmethod
    def _known_default(cls, value: str) -> str:
        if value not in SECCOMP_ACTIONS:
            raise ValueError(f"unknown action {value!r}")
        return value

    def default_errno(self) -> int | None:
        # Docker 20.10 drops defaultErrnoRet; runc's plain SCMP_ACT_ERRNO is EPERM.
        return 1 if self.defaultAction == "SCMP_ACT_ERRNO" else None

    def resolve(self, arch: str, caps: frozenset[str] = frozenset()) -> dict[str, SyscallVerdict]:
        """What the profile does with each named system call on ``arch`` (no capabilities)."""
        go_arch = ARCHES[arch][1]
        rules: dict[str, list[SeccompRule]] = {}
        for rule in self.syscalls:
            if rule.applies(go_arch, caps):
                for name in rule.names:
                    rules.setdefault(name, []).append(rule)
        return {name: _verdict(name, found) for name, found in rules.items()}

    def default_verdict(self, name: str) -> SyscallVerdict:
        return SyscallVerdict(name, _action_kind(self.defaultAction), self.default_errno())


@dataclass(frozen=True, slots=True)
class SyscallVerdict:
    """One system call under one profile: allowed, allowed with conditions, or refused."""

    name: str
    kind: str  # allow | filtered | errno | kill | trap | log | trace | notify
    errno: int | None = None
    conditions: tuple[str, ...] = ()
    comments: tuple[str, ...] = ()

    @property
    def is_allowed(self) -> bool:
        return self.kind in ("allow", "filtered", "log")

    def describe(self) -> str:
        if self.kind == "allow":
            return "allowed"
        if self.kind == "filtered":
            return "allowed if " + " or ".join(self.conditions)
        if self.kind == "errno":
            return f"refused ({errno_name(self.errno)})"
        return self.kind


def _action_kind(action: str) -> str:
    return action.removeprefix("SCMP_ACT_").lower().replace("_thread", "").replace("_process", "")


def _verdict(name: str, rules: list[SeccompRule]) -> SyscallVerdict:
    comments = tuple(dict.fromkeys(rule.comment for rule in rules if rule.comment))
    allowing = [rule for rule in rules if rule.action in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")]
    if any(not rule.args for rule in allowing):
        kind = "log" if all(r.action == "SCMP_ACT_LOG" for r in allowing) else "allow"
        return SyscallVerdict(name, kind, comments=comments)
    if allowing:
        conditions = tuple(
            " and ".join(arg.describe() for arg in rule.args or ()) for rule in allowing
        )
        return SyscallVerdict(name, "filtered", conditions=conditions, comments=comments)
    first = rules[0]
    errno = first.errnoRet if first.errnoRet is not None else 1
    if first.action == "SCMP_ACT_ERRNO":
        return SyscallVerdict(name, "errno", errno, comments=comments)
    return SyscallVerdict(name, _action_kind(first.action), comments=comments)


def errno_name(number: int | None) -> str:
    if number is None:
        return "?"
    return errno_module.errorcode.get(number, str(number))


# -- the bundle -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """The files of one bundle, validated and hashed. Immutable."""

    directory: Path
    config: PolicyConfig
    seccomp: SeccompProfile
    seccomp_json: str  # compact, as handed to Docker
    apparmor_text: str
    sha256: str
    seccomp_sha256: str
    files: tuple[str, ...]  # the hashed files, relative, in hashing order
    warnings: tuple[Finding, ...] = ()

    @property
    def seccomp_path(self) -> Path:
        return self.directory / self.config.seccomp.profile

    @property
    def apparmor_path(self) -> Path:
        return self.directory / self.config.apparmor.file

    @property
    def default_limits(self) -> Limits:
        return limits_of(self.config.limits, "default")


def bundle_sha256(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (relative name, content) pairs in name order: a rename changes it too."""
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(content)
        digest.update(b"\0")
    return digest.hexdigest()


def parse_bundle(directory: Path) -> tuple[PolicyBundle | None, list[Finding]]:
    """Read and validate a bundle; every problem becomes a finding (nothing raises)."""
    findings: list[Finding] = []
    toml_path = directory / POLICY_FILE
    try:
        raw_toml = toml_path.read_bytes()
    except OSError as exc:
        return None, [Finding("files.missing", POLICY_FILE, f"cannot read: {exc.strerror}")]
    try:
        config = PolicyConfig.model_validate(tomllib.loads(raw_toml.decode("utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, [Finding("schema.syntax", POLICY_FILE, f"not valid TOML: {exc}")]
    except ValidationError as exc:
        return None, _schema_findings(POLICY_FILE, exc)

    files: list[tuple[str, bytes]] = [(POLICY_FILE, raw_toml)]
    seccomp: SeccompProfile | None = None
    raw_seccomp = b""
    seccomp_name = config.seccomp.profile
    if seccomp_name == "unconfined":
        findings.append(
            Finding("seccomp.unconfined", POLICY_FILE, "[seccomp] profile = 'unconfined'")
        )
    elif (problem := _bundle_path_problem(directory, seccomp_name)) is not None:
        findings.append(Finding("files.outside-bundle", POLICY_FILE, f"[seccomp] {problem}"))
    else:
        try:
            raw_seccomp = (directory / seccomp_name).read_bytes()
            seccomp = SeccompProfile.model_validate(json.loads(raw_seccomp))
            files.append((seccomp_name, raw_seccomp))
        except OSError as exc:
            findings.append(
                Finding("files.missing", POLICY_FILE, f"[seccomp] {seccomp_name}: {exc.strerror}")
            )
        except ValueError as exc:  # JSON syntax (ValidationError is a ValueError too)
            if isinstance(exc, ValidationError):
                findings.extend(_schema_findings(seccomp_name, exc))
            else:
                findings.append(Finding("schema.syntax", seccomp_name, f"not valid JSON: {exc}"))

    apparmor_text = ""
    apparmor_name = config.apparmor.file
    if (problem := _bundle_path_problem(directory, apparmor_name)) is not None:
        findings.append(Finding("files.outside-bundle", POLICY_FILE, f"[apparmor] {problem}"))
    else:
        try:
            raw_apparmor = (directory / apparmor_name).read_bytes()
            apparmor_text = raw_apparmor.decode("utf-8")
            files.append((apparmor_name, raw_apparmor))
        except OSError as exc:
            findings.append(
                Finding("files.missing", POLICY_FILE, f"[apparmor] {apparmor_name}: {exc.strerror}")
            )
        except UnicodeDecodeError:
            findings.append(Finding("schema.syntax", apparmor_name, "not UTF-8 text"))

    if seccomp is None or findings:
        return None, findings
    bundle = PolicyBundle(
        directory=directory,
        config=config,
        seccomp=seccomp,
        seccomp_json=json.dumps(json.loads(raw_seccomp), separators=(",", ":")),
        apparmor_text=apparmor_text,
        sha256=bundle_sha256(files),
        seccomp_sha256=hashlib.sha256(raw_seccomp).hexdigest(),
        files=tuple(sorted(name for name, _ in files)),
    )
    return bundle, findings


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


def _schema_findings(file: str, exc: ValidationError) -> list[Finding]:
    findings = []
    for error in exc.errors():
        where = _location(error["loc"])
        findings.append(Finding("schema", file, f"{where}: {error['msg']}"))
    return findings


def _location(loc: tuple[int | str, ...]) -> str:
    """``('limits', 'memory_mb', 'default')`` -> ``[limits] memory_mb.default``."""
    parts = [str(part) for part in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return parts[0]
    return f"[{parts[0]}] " + ".".join(parts[1:])


def _bundle_path_problem(directory: Path, relative: str) -> str | None:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        return f"{relative!r} must be a path inside the bundle"
    resolved = (directory / relative).resolve()
    if directory.resolve() not in resolved.parents:
        return f"{relative!r} resolves outside the bundle"
    return None


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


def check_seccomp(file: str, profile: SeccompProfile) -> list[Finding]:
    findings = []

    def add(rule: str, message: str, severity: Severity = Severity.ERROR) -> None:
        findings.append(Finding(rule, file, message, severity))

    if profile.defaultAction not in REFUSING_ACTIONS:
        add(
            "seccomp.default-allows",
            f"defaultAction {profile.defaultAction} does not refuse: the profile must deny by "
            "default",
        )
    if profile.architectures:
        add(
            "seccomp.architectures",
            "use archMap with native architectures only, not `architectures` (Docker then "
            "adds every listed ABI)",
        )
    native = [entry.architecture for entry in profile.archMap or ()]
    for entry in profile.archMap or ():
        if entry.subArchitectures:
            add(
                "seccomp.non-native-arch",
                f"archMap {entry.architecture} adds {', '.join(entry.subArchitectures)}: a "
                "foreign system-call ABI (on x86_64: i386 through int 0x80) must be refused",
            )
    supported = [arch for arch, (scmp, _) in ARCHES.items() if scmp in native]
    if not supported:
        add("seccomp.non-native-arch", "archMap names neither SCMP_ARCH_X86_64 nor AARCH64")
    table = syscall_table()
    for arch in supported:
        verdicts = profile.resolve(arch)
        for name in REQUIRED_REFUSALS:
            verdict = verdicts.get(name)
            if verdict is not None and verdict.is_allowed:
                add("seccomp.required-refusal", f"{name} is {verdict.describe()} on {arch}")
        for name in MUST_BE_FILTERED:
            verdict = verdicts.get(name)
            if verdict is not None and verdict.kind in ("allow", "log"):
                add(
                    "seccomp.unfiltered",
                    f"{name} is allowed without an argument filter on {arch}",
                )
        clone = verdicts.get("clone")
        if (
            clone is not None
            and clone.kind == "filtered"
            and not _clone_filters_namespaces(profile, ARCHES[arch][1])
        ):
            add(
                "seccomp.unfiltered",
                f"clone is allowed on {arch} without refusing the namespace flags "
                f"({CLONE_NAMESPACE_MASK:#x})",
            )
        clone3 = verdicts.get("clone3")
        if clone3 is not None and clone3.is_allowed:
            add("seccomp.required-refusal", f"clone3 is {clone3.describe()} on {arch}")
        elif clone3 is None or clone3.errno != ENOSYS:
            add(
                "seccomp.clone3-enosys",
                f"clone3 should answer ENOSYS on {arch} (glibc falls back to the filtered "
                "clone only then)",
                Severity.WARNING,
            )
        unknown = sorted(set(verdicts) - set(table.get(arch, {})) - _other_arch_names(table, arch))
        if unknown and table:
            add(
                "seccomp.unknown-syscall",
                f"names no system call on any supported architecture: {', '.join(unknown)}",
                Severity.WARNING,
            )
    return _dedupe(findings)


def _other_arch_names(table: Mapping[str, Mapping[str, int]], arch: str) -> set[str]:
    return {name for other, names in table.items() if other != arch for name in names}


def _clone_filters_namespaces(profile: SeccompProfile, go_arch: str) -> bool:
    """Every rule allowing ``clone`` requires ``arg0 & mask == 0`` for the namespace flags."""
    for rule in profile.syscalls:
        if "clone" not in rule.names or rule.action not in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
            continue
        if not rule.applies(go_arch):
            continue
        if not any(
            arg.index == 0
            and arg.op == "SCMP_CMP_MASKED_EQ"
            and arg.value & CLONE_NAMESPACE_MASK == CLONE_NAMESPACE_MASK
            and arg.valueTwo == 0
            for arg in rule.args or ()
        ):
            return False
    return True


def _dedupe(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))


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


# -- reference data -------------------------------------------------------------------


@functools.cache
def syscall_table(path: Path = SYSCALL_TABLE) -> dict[str, dict[str, int]]:
    """System-call names per native architecture (reference data; empty if missing)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {arch: dict(document[arch]) for arch in ARCHES if arch in document}


def docker_default_profile(path: Path = DOCKER_DEFAULT_PROFILE) -> SeccompProfile:
    try:
        return SeccompProfile.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"Cannot read Docker's default profile {path}", hint=str(exc)
        ) from exc


@dataclass(frozen=True, slots=True)
class SyscallDifference:
    name: str
    ours: str
    docker: str
    ours_conditions: tuple[str, ...] = ()  # when ours allows it only with arguments

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"syscall": self.name, "ours": self.ours, "docker": self.docker}
        if self.ours_conditions:
            document["oursOnlyIf"] = list(self.ours_conditions)
        return document


@dataclass(frozen=True, slots=True)
class DockerComparison:
    """How our profile differs from Docker's default, system call by system call."""

    arch: str
    ours_allowed: int
    docker_allowed: int
    refused_only_by_ours: tuple[SyscallDifference, ...]
    narrowed_by_ours: tuple[SyscallDifference, ...]
    allowed_only_by_ours: tuple[SyscallDifference, ...]
    errno_differs: tuple[SyscallDifference, ...]
    docker_names_not_on_arch: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "capabilities": [],
            "oursAllowed": self.ours_allowed,
            "dockerAllowed": self.docker_allowed,
            "refusedOnlyByOurs": [d.as_json() for d in self.refused_only_by_ours],
            "narrowedByOurs": [d.as_json() for d in self.narrowed_by_ours],
            "allowedOnlyByOurs": [d.as_json() for d in self.allowed_only_by_ours],
            "errnoDiffers": [d.as_json() for d in self.errno_differs],
            "dockerNamesNotOnArch": list(self.docker_names_not_on_arch),
        }


def compare_with_docker(
    ours: SeccompProfile, docker: SeccompProfile, arch: str
) -> DockerComparison:
    """Both profiles resolved as Docker would for ``arch`` with no capabilities."""
    names_on_arch = set(syscall_table().get(arch, {}))
    our_map, docker_map = ours.resolve(arch), docker.resolve(arch)
    mentioned = set(our_map) | set(docker_map)
    if names_on_arch:
        not_on_arch = sorted(name for name in docker_map if name not in names_on_arch)
        mentioned &= names_on_arch
    else:
        not_on_arch = []
    numbers = syscall_table().get(arch, {})
    refused, narrowed, added, errnos = [], [], [], []
    ours_allowed = docker_allowed = 0
    for name in sorted(mentioned):
        mine = our_map.get(name) or _unlisted(ours, our_map, name, numbers)
        theirs = docker_map.get(name) or _unlisted(docker, docker_map, name, numbers)
        ours_allowed += mine.is_allowed
        docker_allowed += theirs.is_allowed
        difference = SyscallDifference(name, mine.describe(), theirs.describe(), mine.conditions)
        if theirs.is_allowed and not mine.is_allowed:
            refused.append(difference)
        elif mine.is_allowed and not theirs.is_allowed:
            added.append(difference)
        elif mine.is_allowed and theirs.is_allowed:
            if mine.kind != theirs.kind or mine.conditions != theirs.conditions:
                narrowed.append(difference)
        elif (mine.kind, mine.errno) != (theirs.kind, theirs.errno):
            errnos.append(difference)
    return DockerComparison(
        arch=arch,
        ours_allowed=ours_allowed,
        docker_allowed=docker_allowed,
        refused_only_by_ours=tuple(refused),
        narrowed_by_ours=tuple(narrowed),
        allowed_only_by_ours=tuple(added),
        errno_differs=tuple(errnos),
        docker_names_not_on_arch=tuple(not_on_arch),
    )


def _unlisted(
    profile: SeccompProfile,
    listed: Mapping[str, SyscallVerdict],
    name: str,
    numbers: Mapping[str, int],
) -> SyscallVerdict:
    """A call the profile does not name: its default action, except runc's ENOSYS stub.

    runc answers ENOSYS for any call numbered above the highest one the profile names
    (so that a newer libc falls back); policies/README.md section 1.2.
    """
    highest = max((numbers[n] for n in listed if n in numbers), default=-1)
    if numbers.get(name, -1) > highest >= 0:
        return SyscallVerdict(name, "errno", ENOSYS, comments=("runc's ENOSYS stub",))
    return profile.default_verdict(name)


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
