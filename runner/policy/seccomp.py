"""Seccomp profiles in Docker's JSON format: the schema, each call's verdict, the rules.

Owns: the pydantic models of a profile (an unknown action or comparison is a schema
error), the resolution of a profile into one :class:`SyscallVerdict` per system call
as Docker applies it on one architecture, the reference table of system-call names
(``policies/reference/syscalls.json``), and the lint rules of a profile
(:func:`check_seccomp`). The calls the profile must refuse, and those it may allow only
with argument filters, live here in code: a bundle cannot weaken its own linter.

Must not import: the bundle, docker_default, lint, explain or effective modules of
this package (they build on this one), docker or the sandbox implementations. From
:mod:`runner.settings` only ``DATA_ROOT`` (where the reference data is); it never
reads the environment.
"""

from __future__ import annotations

import errno as errno_module
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from runner.policy.model import Finding, FrozenModel, Severity
from runner.settings import DATA_ROOT

REFERENCE_DIR = DATA_ROOT / "policies" / "reference"
SYSCALL_TABLE = REFERENCE_DIR / "syscalls.json"


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


# -- what the linter insists on, whatever the bundle says -------------------------------
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


# -- seccomp profile schema (Docker's JSON format) --------------------------------------


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


# -- reference data ---------------------------------------------------------------------


@functools.cache
def syscall_table(path: Path = SYSCALL_TABLE) -> dict[str, dict[str, int]]:
    """System-call names per native architecture (reference data; empty if missing)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {arch: dict(document[arch]) for arch in ARCHES if arch in document}


# -- lint rules of a profile ------------------------------------------------------------


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
