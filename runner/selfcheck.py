"""The self-check: prove, from inside canary containers, what the policy promises.

Before the runner takes tasks it runs two canary tasks through the very sandbox and
pipeline tasks use, under the real isolation (seccomp profile, capabilities,
no-new-privileges, network, read-only root, uid, AppArmor where the host has it),
with the in-process guards switched off so the canary can read ``/proc`` and call
the kernel directly:

- the *facts* canary reads ``/proc/self/status`` (Seccomp, NoNewPrivs, capability
  sets) and asks the kernel for no-new-privileges through ``prctl``, lists network
  interfaces, reads the options of the mount at ``/`` and tries to write there, makes
  system calls that only our profile refuses (``io_uring_setup`` answers EPERM under
  ours, EFAULT under Docker's default), reads its cgroup limits (memory, pids, and the
  CPU quota and period, from ``cpu.max`` on cgroup v2 or ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us`` on v1, whichever the host has, detected at run time) and its
  ``RLIMIT_NPROC``, counts the tasks already in its container and starts threads
  until the limit refuses one;
- the *memory* canary allocates past its (small) memory limit and must end as
  ``memory_limit_exceeded`` (the host's OOM record decides that, never the canary).

Where the sandbox has a host view (:class:`~runner.sandbox.base.HostLimitsView`: the
OCI backend), the limits applied to the facts canary's container are also read *on
the host*, from its cgroups, and must be the policy's too.

Which kernel answers the canary (:class:`~runner.sandbox.base.SandboxKernel`, from
the sandbox in use, never from the canary) decides where each fact is read. Under
gVisor the sandbox kernel's ``/proc/self/status`` has no NoNewPrivs or CapAmb line,
its ``/sys/fs/cgroup`` is not the host's (it shows none of the limits), a write to
``/`` by the task user is refused for permission (EACCES) before the read-only mount
is consulted, and the task's threads are the sandbox kernel's, not host threads.
So there: no-new-privileges is ``prctl(PR_GET_NO_NEW_PRIVS)``; no ambient capability
follows from CapPrm 0 (ambient is a subset of permitted and inheritable); read-only is
the mount's own ``ro``; the memory, pids and CPU limits are the host's reading of the
container's cgroups (which hold the sandbox kernel with the task); and the task's
processes and threads are held to the pids limit by the sandbox kernel's
``RLIMIT_NPROC`` (the OCI backend sets it so), which the thread loop must hit exactly.
Nothing passes on gVisor that is not proven there; without a host view its limits
fail. Under Linux every check of before stands, as strict (the new readings are
additional ones).

Each guarantee of :data:`runner.policy.GUARANTEES` becomes pass, fail or
not-available; the bundle's ``[selfcheck]`` section says which are required. A
required one that does not pass stops the runner
(:class:`~runner.errors.IsolationNotEnforcedError`); an optional one (AppArmor on a
kernel without it) is reported in health, in the logs and in every task's audit
record. Results are cached per engine (Docker daemon or OCI runtime), sandbox kernel,
policy sha256, image and AppArmor profile, in memory and in a small JSON file, so the
check costs nothing per task.

Must not: import docker (it is handed a :class:`~runner.sandbox.base.Sandbox` and
the daemon's description), read the environment at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from runner.analyzer import Analyzer, ImportPolicy
from runner.errors import IsolationNotEnforcedError
from runner.pipeline import AuditContext, TaskPipeline, TaskReport, TaskRequest
from runner.policy import GUARANTEES, EffectivePolicy
from runner.sandbox.base import (
    MIB,
    NANOS_PER_CPU,
    AppliedLimits,
    GuardConfig,
    HostLimitsView,
    Outcome,
    Sandbox,
    SandboxKernel,
)

log = logging.getLogger(__name__)

# 2: the cpu-limit guarantee; 3: the host's view of the limits, the sandbox kernel
# (gVisor's facts read where it has them), the thread loop stopping exactly at the limit.
CACHE_FORMAT = 3
# The in-process guards off: the canary must read /proc and call the kernel itself.
CANARY_GUARDS = GuardConfig(
    stdlib_allow=("*",), external_allow=("*",), builtins_deny=(), block_env_access=False
)
CANARY_IMPORTS = ImportPolicy(frozenset({"*"}), frozenset({"*"}))
# How far past its limit a canary goes before it gives up (when a limit does not bite).
OVERSHOOT = 4

# Answers under our profile (policies/README.md 1.9): each of these is allowed by
# Docker's default profile, which answers with the kernel's own error instead. The
# same under gVisor, which applies our profile inside its kernel (``--oci-seccomp``):
# its own answers would be ENOSYS, ESRCH and EAFNOSUPPORT. clone3's ENOSYS comes from
# a rule gVisor would answer EPERM as written, so the OCI backend renders it in a
# form gVisor answers ENOSYS too (runner/sandbox/oci/config.py): EPERM there made
# every thread start fail.
OUR_PROFILE_ANSWERS = {
    "io_uring_setup": "EPERM",  # Docker's default: EFAULT
    "ptrace_peekdata": "EPERM",  # Docker's default: ESRCH
    "socket_af_vsock": "EPERM",  # Docker's default: EINVAL
    "clone3": "ENOSYS",  # both: glibc then falls back to the filtered clone
}

FACTS_CANARY = r"""
import ctypes, errno, os, platform, resource, socket, threading

def status(name):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None

def first_readable(paths):
    for path in paths:
        try:
            with open(path) as handle:
                return handle.read().strip()
        except OSError:
            continue
    return None

def name_of(code):
    return errno.errorcode.get(code, str(code))

# Raw system calls with arguments the kernel itself rejects (EFAULT, ESRCH, EINVAL):
# only a seccomp filter answers EPERM, and nothing can succeed by accident.
NUMBERS = {
    "x86_64": {"io_uring_setup": 425, "ptrace": 101, "socket": 41, "clone3": 435},
    "aarch64": {"io_uring_setup": 425, "ptrace": 117, "socket": 198, "clone3": 435},
}.get(platform.machine())
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(name, *args):
    if NUMBERS is None:
        return "unknown architecture " + platform.machine()
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NUMBERS[name]), *(ctypes.c_long(a) for a in args))
    if ret == -1:
        return name_of(ctypes.get_errno())
    if name == "socket" and ret >= 0:
        os.close(ret)
    return "succeeded"

def prctl(option):
    ctypes.set_errno(0)
    ret = libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(0) for _ in range(4)))
    return ret if ret >= 0 else name_of(ctypes.get_errno())

def root_mount_options():
    # The per-mount options of what is mounted at /: the last such line is on top.
    found = None
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 5 and fields[4] == "/":
                found = fields[5]
    return found

def tasks():
    # Every process and thread in the container's PID namespace, as counted against
    # a pids limit (the pids cgroup under Linux, RLIMIT_NPROC under gVisor).
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += len(os.listdir("/proc/" + entry + "/task"))
            except OSError:
                continue
    return count

facts = {
    "uid": os.getuid(), "gid": os.getgid(),
    "seccomp": status("Seccomp"), "no_new_privs": status("NoNewPrivs"),
    "no_new_privs_prctl": prctl(39),  # PR_GET_NO_NEW_PRIVS
    "cap_eff": status("CapEff"), "cap_prm": status("CapPrm"),
    "cap_bnd": status("CapBnd"), "cap_amb": status("CapAmb"), "cap_inh": status("CapInh"),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "syscalls": {
        "io_uring_setup": call("io_uring_setup", 1, 0),
        "ptrace_peekdata": call("ptrace", 2, 0x3FFFFFFF, 0, 0),
        "socket_af_vsock": call("socket", 40, 3 | 0x40000000, 0),
        "clone3": call("clone3", 0, 0),
    },
    "apparmor": first_readable(["/proc/self/attr/apparmor/current", "/proc/self/attr/current"]),
    "memory_limit": first_readable(
        ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    ),
    "pids_max": first_readable(["/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"]),
    "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
    "root_mount": root_mount_options(),
}

# The CPU quota in force, as the kernel sees it. cgroup v2 has cgroup.controllers at
# its root and "quota period" (or "max period") in cpu.max; v1 has one file each,
# where the quota -1 means unlimited. Detected here, never assumed from the host.
if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
    quota, _, period = (first_readable(["/sys/fs/cgroup/cpu.max"]) or "").partition(" ")
    facts["cpu"] = {"cgroup": "v2", "quota": quota or None, "period": period or None}
else:
    v1 = ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct,cpu"]
    facts["cpu"] = {
        "cgroup": "v1",
        "quota": first_readable([d + "/cpu.cfs_quota_us" for d in v1]),
        "period": first_readable([d + "/cpu.cfs_period_us" for d in v1]),
    }
try:
    fd = os.open("/.sandbox-selfcheck", os.O_WRONLY | os.O_CREAT, 0o600)
except OSError as exc:
    facts["root_write"] = name_of(exc.errno)
else:
    os.close(fd)
    facts["root_write"] = "written"

# Last, as nothing else may need a new process meanwhile: threads until the limit
# refuses one (or the cap, when no limit bites), then release them all. The tasks
# there before count against the same limit.
facts["tasks_before"] = tasks()
release, started, refused = threading.Event(), [], None
try:
    while len(started) < _items[0]["json"]["threadCap"]:
        thread = threading.Thread(target=release.wait, args=(30,))
        thread.start()
        started.append(thread)
except (RuntimeError, OSError) as exc:
    refused = type(exc).__name__ + ": " + str(exc)
finally:
    release.set()
    for thread in started:
        thread.join(30)
facts["threads_started"] = len(started)
facts["thread_refused"] = refused
return facts
"""

MEMORY_CANARY = r"""
hog, chunk = [], b"\x01" * (4 * 1024 * 1024)
while len(hog) * 4 < _items[0]["json"]["capMb"]:
    hog.append(bytearray(chunk))  # a copy: every page is written, so it really counts
return {"allocatedMb": len(hog) * 4}
"""


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a status, not a password
    FAIL = "fail"
    NOT_AVAILABLE = "not-available"


@dataclass(frozen=True, slots=True)
class GuaranteeResult:
    name: str
    status: Status
    required: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "required": self.required,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class SelfCheckReport:
    """What the canaries proved, under which policy, on which daemon."""

    policy_sha256: str
    daemon_id: str
    results: tuple[GuaranteeResult, ...]
    checked_at: str  # wall clock, ISO 8601 UTC
    duration_ms: float
    key: str = ""
    cached: bool = False

    @property
    def is_ok(self) -> bool:
        """Every required guarantee holds."""
        return not self.missing_required

    @property
    def missing_required(self) -> list[GuaranteeResult]:
        return [r for r in self.results if r.required and r.status is not Status.PASS]

    @property
    def missing_optional(self) -> list[GuaranteeResult]:
        return [r for r in self.results if not r.required and r.status is not Status.PASS]

    def in_force(self) -> dict[str, str]:
        """Guarantee -> pass / fail / not-available (for audit records and health)."""
        return {r.name: r.status.value for r in self.results}

    def audit(self) -> dict[str, Any]:
        """The ``guarantees`` part of every task's audit record."""
        return {
            "policySha256": self.policy_sha256,
            "checkedAt": self.checked_at,
            "daemonId": self.daemon_id,
            "cached": self.cached,
            "inForce": self.in_force(),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.is_ok,
            "policySha256": self.policy_sha256,
            "daemonId": self.daemon_id,
            "checkedAt": self.checked_at,
            "durationMs": round(self.duration_ms, 1),
            "cached": self.cached,
            "key": self.key,
            "guarantees": [r.as_json() for r in self.results],
        }

    def failure_message(self) -> str:
        missing = ", ".join(f"{r.name} ({r.detail})" for r in self.missing_required)
        return f"Required isolation guarantees are not in force: {missing}"


# -- evaluating the canaries' facts (pure) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class CanaryOutcome:
    """How one canary task ended: its outcome and result, or its error text."""

    outcome: Outcome
    result: Any = None
    error: str = ""

    @classmethod
    def from_report(cls, report: TaskReport) -> CanaryOutcome:
        error = ""
        if report.error is not None:
            error = f"{report.error.code.value}: {report.error.message}"
        return cls(report.outcome, report.result, error)


def evaluate(
    facts: CanaryOutcome,
    memory: CanaryOutcome,
    policy: EffectivePolicy,
    *,
    apparmor_profile: str | None,
    kernel: SandboxKernel = SandboxKernel.LINUX,
    host: AppliedLimits | None = None,
) -> tuple[GuaranteeResult, ...]:
    """Each guarantee from the canaries' outcomes, read where ``kernel`` has each fact,
    with the host's reading of the facts canary's limits (``host``) where the sandbox
    has one; order and required flags from the bundle."""
    selfcheck = policy.bundle.config.selfcheck
    limits = policy.canary_limits()
    found: dict[str, tuple[Status, str]] = {}
    if facts.outcome is Outcome.SUCCESS and isinstance(facts.result, dict):
        found.update(_from_facts(facts.result, policy, apparmor_profile, kernel, host))
    else:
        reason = f"the canary did not run: {facts.error or facts.outcome.value}"
        found = {name: (Status.FAIL, reason) for name in GUARANTEES}
        if apparmor_profile is None:
            found["apparmor"] = (Status.NOT_AVAILABLE, "host kernel has no AppArmor")
    memory_status, memory_detail = _memory(memory, limits.memory_bytes)
    limit_status, limit_detail = found.get("memory-limit", (Status.PASS, ""))
    if limit_status is not Status.PASS:
        found["memory-limit"] = (limit_status, limit_detail)
    else:
        found["memory-limit"] = (memory_status, f"{limit_detail}; {memory_detail}".strip("; "))
    ordered = [*selfcheck.required, *selfcheck.optional]
    results = []
    for name in ordered:
        status, detail = found.get(name, (Status.FAIL, "not checked"))
        results.append(GuaranteeResult(name, status, name in selfcheck.required, detail))
    return tuple(results)


def _check(ok: bool, detail: str) -> tuple[Status, str]:
    return (Status.PASS if ok else Status.FAIL), detail


def _from_facts(
    facts: Mapping[str, Any],
    policy: EffectivePolicy,
    apparmor_profile: str | None,
    kernel: SandboxKernel,
    host: AppliedLimits | None,
) -> dict[str, tuple[Status, str]]:
    gvisor = kernel is SandboxKernel.GVISOR
    limits = policy.canary_limits()
    out: dict[str, tuple[Status, str]] = {}
    seccomp = facts.get("seccomp")
    out["seccomp-filter"] = _check(seccomp == "2", f"Seccomp: {seccomp} (2 = filter mode)")
    calls = facts.get("syscalls") or {}
    wrong = {k: calls.get(k) for k, want in OUR_PROFILE_ANSWERS.items() if calls.get(k) != want}
    answers = ", ".join(f"{name} {calls.get(name)}" for name in OUR_PROFILE_ANSWERS)
    out["seccomp-profile"] = _check(
        not wrong,
        answers
        if not wrong
        else f"{answers}; expected "
        + ", ".join(f"{name} {OUR_PROFILE_ANSWERS[name]}" for name in wrong),
    )
    out["no-new-privileges"] = _no_new_privileges(facts, gvisor=gvisor)
    out["capabilities-dropped"] = _capabilities(facts, gvisor=gvisor)
    interfaces = facts.get("interfaces")
    out["network-none"] = _check(interfaces == ["lo"], f"interfaces: {interfaces}")
    out["read-only-rootfs"] = _read_only_root(facts, gvisor=gvisor)
    uid, gid, want = facts.get("uid"), facts.get("gid"), policy.bundle.config.image.uid
    out["non-root-user"] = _check(
        uid == want and gid == want and uid != 0, f"uid {uid}, gid {gid} (policy: {want})"
    )
    out["memory-limit"] = _memory_limit(facts, limits.memory_bytes, host, gvisor=gvisor)
    out["pids-limit"] = _pids_limit(facts, limits.pids, host, gvisor=gvisor)
    out["cpu-limit"] = _cpu_limits(facts.get("cpu"), limits.nano_cpus, host, gvisor=gvisor)
    label = facts.get("apparmor")
    if apparmor_profile is None:
        out["apparmor"] = (
            Status.NOT_AVAILABLE,
            "host kernel has no AppArmor" + (f" (task label: {label})" if label else ""),
        )
    else:
        out["apparmor"] = _check(
            label == f"{apparmor_profile} (enforce)",
            f"confined by {label!r} (policy: {apparmor_profile!r} in enforce mode)",
        )
    return out


def _no_new_privileges(facts: Mapping[str, Any], *, gvisor: bool) -> tuple[Status, str]:
    """The status line and ``prctl(PR_GET_NO_NEW_PRIVS)`` both say 1; gVisor's status
    has no such line (its absence there is no evidence either way), so ``prctl`` alone."""
    line, asked = facts.get("no_new_privs"), facts.get("no_new_privs_prctl")
    if gvisor and line is None:
        return _check(
            asked == 1,
            f"prctl(PR_GET_NO_NEW_PRIVS): {asked} (gVisor's /proc/self/status has no "
            "NoNewPrivs line)",
        )
    return _check(
        line == "1" and asked == 1, f"NoNewPrivs: {line}, prctl(PR_GET_NO_NEW_PRIVS): {asked}"
    )


def _capabilities(facts: Mapping[str, Any], *, gvisor: bool) -> tuple[Status, str]:
    """CapEff, CapPrm, CapBnd and CapAmb are 0 (our profile refuses ``capget`` and the
    capability ``prctl`` options, so the status lines are the kernel's one answer).
    gVisor's status has no CapAmb line: the ambient set is a subset of the permitted
    and inheritable ones (both kernels keep that rule), so CapPrm 0 proves it empty."""
    caps = {name: facts.get(f"cap_{name}") for name in ("eff", "prm", "bnd", "amb")}
    shown = ", ".join(f"Cap{name.capitalize()} {value}" for name, value in caps.items())
    if gvisor and caps["amb"] is None:
        listed = [value for name, value in caps.items() if name != "amb"]
        return _check(
            all(_hex_is_zero(value) for value in listed),
            f"{shown} (gVisor has no CapAmb line: ambient is a subset of permitted and "
            f"inheritable, CapInh {facts.get('cap_inh')}, so CapPrm 0 proves it empty)",
        )
    return _check(all(_hex_is_zero(value) for value in caps.values()), shown)


def _read_only_root(facts: Mapping[str, Any], *, gvisor: bool) -> tuple[Status, str]:
    """The mount at ``/`` is ``ro`` and a write there is refused. Linux refuses it for
    the read-only mount (EROFS) before any permission check; gVisor checks the task
    user's permission on ``/`` first (EACCES), so there the mount's ``ro`` is the proof
    and the write need only fail."""
    options, wrote = facts.get("root_mount"), facts.get("root_write")
    mount_ro = isinstance(options, str) and "ro" in options.split(",")
    refused = ("EROFS", "EACCES") if gvisor else ("EROFS",)
    detail = f"mount at / is {options}; writing / gave {wrote}"
    if gvisor:
        detail += " (gVisor checks permission before the read-only mount)"
    return _check(mount_ro and wrote in refused, detail)


NO_HOST_VIEW = "no host view: gVisor shows its task none of the host's cgroups"


def _memory_limit(
    facts: Mapping[str, Any], want: int, host: AppliedLimits | None, *, gvisor: bool
) -> tuple[Status, str]:
    """The memory cgroup's limit is the canary's: as the canary reads it (Linux) and as
    the host reads it (where it can). gVisor shows its task no cgroup of the host's:
    there the host's reading is the proof (the cgroup holds the sandbox kernel, which
    holds the task's memory), and without one it fails."""
    inside = facts.get("memory_limit")
    if gvisor:
        if host is None:
            return Status.FAIL, f"{NO_HOST_VIEW} (memory limit {inside})"
        return _check(
            host.memory_limit == str(want),
            f"on the host (cgroup {host.cgroup}): memory limit {host.memory_limit} "
            f"(canary: {want}), for the sandbox kernel and the task together",
        )
    detail = f"cgroup memory limit {inside} (canary: {want})"
    if host is None:
        return _check(inside == str(want), detail)
    return _check(
        inside == str(want) and host.memory_limit == str(want),
        f"{detail}, on the host {host.memory_limit}",
    )


def _pids_limit(
    facts: Mapping[str, Any], pids: int, host: AppliedLimits | None, *, gvisor: bool
) -> tuple[Status, str]:
    """The pids limit is set, and the thread loop stops *at* it: the tasks already in
    the container and the threads started add up to the limit (a loop stopped by
    anything else, such as a refused ``clone3``, does not).

    Linux: the pids cgroup's ``pids.max`` is the canary's, inside and on the host.
    gVisor: the task's processes and threads are the sandbox kernel's, counted by its
    ``RLIMIT_NPROC`` (set to the canary's pids), and the host's pids cgroup holds the
    sandbox kernel's own threads: its ``pids.max`` is the limit plus the room the
    engine gave them, read on the host.
    """
    before, started = facts.get("tasks_before"), facts.get("threads_started")
    refused = facts.get("thread_refused")
    stops_at_limit = (
        refused is not None
        and isinstance(before, int)
        and isinstance(started, int)
        and before + started == pids
    )
    loop = f"{before} tasks + {started} threads started, then {refused or 'none refused'}"
    if gvisor:
        nproc = facts.get("nproc")
        counted = (
            f"gVisor: the task's processes and threads are the sandbox kernel's, held by "
            f"its RLIMIT_NPROC {nproc} (canary: {pids}): {loop}"
        )
        if host is None:
            return Status.FAIL, f"{counted}; {NO_HOST_VIEW}"
        return _check(
            stops_at_limit
            and nproc == [pids, pids]
            and host.pids_max == str(pids + host.pids_room),
            f"{counted}; on the host (cgroup {host.cgroup}): pids.max {host.pids_max} "
            f"(canary {pids} + {host.pids_room} for the sandbox kernel's own threads)",
        )
    inside = facts.get("pids_max")
    detail = f"cgroup pids.max {inside} (canary: {pids})"
    host_ok = True
    if host is not None:
        host_ok = host.pids_max == str(pids + host.pids_room)
        detail += f", on the host {host.pids_max}"
    return _check(inside == str(pids) and host_ok and stops_at_limit, f"{detail}; {loop}")


def _cpu_limits(
    cpu: object, nano_cpus: int, host: AppliedLimits | None, *, gvisor: bool
) -> tuple[Status, str]:
    """The CFS quota as the canary reads it (Linux) and as the host reads it (where it
    can); under gVisor the host's reading alone (the quota holds the sandbox kernel
    and the task together)."""
    on_host = None
    if host is not None:
        on_host = _cpu_limit(
            {
                "cgroup": f"{host.cgroup} on the host",
                "quota": host.cpu_quota,
                "period": host.cpu_period,
            },
            nano_cpus,
        )
    if gvisor:
        if on_host is None:
            return Status.FAIL, NO_HOST_VIEW
        return on_host[0], f"{on_host[1]}, for the sandbox kernel and the task together"
    inside = _cpu_limit(cpu, nano_cpus)
    if on_host is None:
        return inside
    both = inside[0] is Status.PASS and on_host[0] is Status.PASS
    return _check(both, f"{inside[1]}; {on_host[1]}")


def _cpu_limit(cpu: object, nano_cpus: int) -> tuple[Status, str]:
    """The CFS quota the canary read against the one the policy's cpus asks for.

    Docker turns ``NanoCpus`` into ``quota = NanoCpus * period / 1e9`` over its
    period (100 ms); unlimited (``max`` on v2, ``-1`` on v1) or any other quota fails.
    """
    if not isinstance(cpu, dict):
        return Status.FAIL, "the canary could not read its CPU quota"
    version, quota, period = cpu.get("cgroup"), cpu.get("quota"), cpu.get("period")
    try:
        quota_us, period_us = int(str(quota)), int(str(period))
    except ValueError:
        return (
            Status.FAIL,
            f"cgroup {version}: CPU quota {quota!r} per period {period!r}: unlimited",
        )
    want = nano_cpus * period_us // NANOS_PER_CPU
    detail = (
        f"cgroup {version}: CFS quota {quota_us} us per {period_us} us "
        f"(policy: {nano_cpus / NANOS_PER_CPU:g} CPUs = {want} us)"
    )
    return (Status.PASS if quota_us == want and quota_us > 0 else Status.FAIL), detail


def _hex_is_zero(value: object) -> bool:
    try:
        return isinstance(value, str) and int(value, 16) == 0
    except ValueError:
        return False


def _memory(memory: CanaryOutcome, limit_bytes: int) -> tuple[Status, str]:
    if memory.outcome is Outcome.MEMORY_LIMIT:
        return Status.PASS, f"an allocation past {limit_bytes // MIB} MiB was OOM-killed"
    if memory.outcome is Outcome.SUCCESS:
        allocated = memory.result.get("allocatedMb") if isinstance(memory.result, dict) else "?"
        return Status.FAIL, f"allocated {allocated} MiB past a {limit_bytes // MIB} MiB limit"
    return Status.FAIL, f"the memory canary ended as {memory.error or memory.outcome.value}"


# -- running the canaries --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelfCheckTarget:
    """Where the canaries run: the sandbox tasks will run in, and what is behind it."""

    sandbox: Sandbox
    policy: EffectivePolicy
    # The AppArmor profile the sandbox applies (None: the host has no AppArmor).
    apparmor_profile: str | None
    daemon: Mapping[str, str] = field(default_factory=dict)  # runner.sandbox.docker.describe_daemon
    image: str = ""
    image_id: str | None = None
    runner_id: str = "selfcheck"
    # Which kernel answers the canaries (the sandbox's, e.g. OciSandbox.kernel), and
    # what reads the limits applied to a canary's container on the host (None: none).
    kernel: SandboxKernel = SandboxKernel.LINUX
    host_view: HostLimitsView | None = None

    @property
    def cache_key(self) -> str:
        identity = {
            "format": CACHE_FORMAT,
            "daemon": dict(sorted(self.daemon.items())),
            "kernel": self.kernel.value,
            "policySha256": self.policy.sha256,
            "image": self.image_id or self.image,
            "apparmorProfile": self.apparmor_profile,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


async def run_selfcheck(target: SelfCheckTarget) -> SelfCheckReport:
    """Run both canaries now (no cache); infrastructure faults propagate."""
    policy = target.policy
    limits = policy.canary_limits()
    pipeline = TaskPipeline(
        sandbox=target.sandbox,
        analyzer=Analyzer(CANARY_IMPORTS),
        guards=CANARY_GUARDS,
        limits=limits,
        context=AuditContext(
            runner_id=target.runner_id,
            image=target.image,
            image_id=target.image_id,
            isolation={"selfcheck": "canary"},
            policy_sha256=policy.sha256,
        ),
    )
    checked_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    begin = time.monotonic()
    facts_request = TaskRequest(
        code=FACTS_CANARY, items=[{"json": {"threadCap": limits.pids * OVERSHOOT}}]
    )
    memory_cap_mb = limits.memory_bytes // MIB * OVERSHOOT
    memory_request = TaskRequest(code=MEMORY_CANARY, items=[{"json": {"capMb": memory_cap_mb}}])
    host_view = target.host_view
    if host_view is not None:
        host_view.observe_limits(facts_request.task_id)
    try:
        async with asyncio.TaskGroup() as group:
            facts_task = group.create_task(pipeline.run(facts_request))
            memory_task = group.create_task(pipeline.run(memory_request))
    except ExceptionGroup as failed:
        # A fault of the engine (it cannot start a canary) is one error, as it would be
        # for a task: the caller handles our error tree, not a group of them.
        raise failed.exceptions[0] from None
    finally:
        applied = host_view.observed_limits(facts_request.task_id) if host_view else None
    duration_ms = (time.monotonic() - begin) * 1000
    results = evaluate(
        CanaryOutcome.from_report(facts_task.result()),
        CanaryOutcome.from_report(memory_task.result()),
        policy,
        apparmor_profile=target.apparmor_profile,
        kernel=target.kernel,
        host=applied,
    )
    return SelfCheckReport(
        policy_sha256=policy.sha256,
        daemon_id=target.daemon.get("id", ""),
        results=results,
        checked_at=checked_at,
        duration_ms=duration_ms,
        key=target.cache_key,
    )


async def ensure_selfcheck(
    target: SelfCheckTarget,
    *,
    cache: SelfCheckCache | None = None,
    refresh: bool = False,
) -> SelfCheckReport:
    """The self-check result for ``target``: cached when one passed before, else run now.

    Raises :class:`~runner.errors.IsolationNotEnforcedError` when a required guarantee
    is not in force (the runner must not take tasks). Optional ones that are missing
    are logged as warnings and stay in the report. Only passing results are cached,
    so a failure is retried at the next start.
    """
    cache = cache if cache is not None else SelfCheckCache(None)
    key = target.cache_key
    report = None if refresh else await asyncio.to_thread(cache.get, key)
    if report is None:
        report = await run_selfcheck(target)
        log.info("self-check ran in %.0f ms: %s", report.duration_ms, report.in_force())
        if report.is_ok:
            await asyncio.to_thread(cache.put, report)
    # Said loudly when the canaries ran; a cached result (every later start of a
    # one-shot `exec`) only repeats it at INFO. The audit records carry it always.
    level = logging.INFO if report.cached else logging.WARNING
    for missing in report.missing_optional:
        log.log(
            level,
            "optional isolation guarantee %s is %s: %s",
            missing.name,
            missing.status.value,
            missing.detail,
        )
    if not report.is_ok:
        raise IsolationNotEnforcedError(
            report.failure_message(),
            hint="the runner takes no tasks; `sandbox-runner selfcheck` shows every guarantee",
        )
    return report


# -- the cache ----------------------------------------------------------------------


class _CachedGuarantee(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    status: Status
    required: bool
    detail: str


class _CachedReport(BaseModel):
    """The cache file (a trust boundary of sorts: validated on the way in)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int
    key: str
    policySha256: str
    daemonId: str
    checkedAt: str
    durationMs: float
    guarantees: tuple[_CachedGuarantee, ...]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sandbox-runner``, else ``~/.cache/sandbox-runner`` (read when called)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sandbox-runner"


class SelfCheckCache:
    """Passing self-check reports by key: in this process, and in ``directory`` (if any).

    Keep one instance for the life of a process (the service) so that later lookups
    never touch the disk.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, SelfCheckReport] = {}

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"selfcheck-{key[:32]}.json"

    def get(self, key: str) -> SelfCheckReport | None:
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if path is None:
            return None
        try:
            stored = _CachedReport.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None  # missing, unreadable or not ours: run the check again
        if stored.format != CACHE_FORMAT or stored.key != key:
            return None
        report = SelfCheckReport(
            policy_sha256=stored.policySha256,
            daemon_id=stored.daemonId,
            results=tuple(
                GuaranteeResult(g.name, g.status, g.required, g.detail) for g in stored.guarantees
            ),
            checked_at=stored.checkedAt,
            duration_ms=stored.durationMs,
            key=key,
            cached=True,
        )
        if not report.is_ok:
            return None
        self._memory[key] = report
        return report

    def put(self, report: SelfCheckReport) -> None:
        self._memory[report.key] = replace(report, cached=True)
        path = self.path(report.key)
        if path is None:
            return
        document = {
            "format": CACHE_FORMAT,
            "key": report.key,
            "policySha256": report.policy_sha256,
            "daemonId": report.daemon_id,
            "checkedAt": report.checked_at,
            "durationMs": round(report.duration_ms, 1),
            "guarantees": [r.as_json() for r in report.results],
        }
        temporary: str | None = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Atomic replace: a concurrent reader sees the old file or the new one.
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, prefix=".selfcheck-", delete=False, encoding="utf-8"
            ) as handle:
                temporary = handle.name
                json.dump(document, handle, indent=1)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("could not write the self-check cache %s: %s", path, exc)
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


__all__ = [
    "CanaryOutcome",
    "GuaranteeResult",
    "SelfCheckCache",
    "SelfCheckReport",
    "SelfCheckTarget",
    "Status",
    "default_cache_dir",
    "ensure_selfcheck",
    "evaluate",
    "run_selfcheck",
]
