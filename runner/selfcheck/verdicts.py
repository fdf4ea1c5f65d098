"""From the canaries' outcomes to each guarantee's verdict (pure): every fact read
where the sandbox kernel has it, the host's reading of the limits where there is one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.pipeline import TaskReport
from runner.policy import GUARANTEES, EffectivePolicy
from runner.sandbox.base import MIB, NANOS_PER_CPU, AppliedLimits, Outcome, SandboxKernel
from runner.selfcheck.canaries import OUR_PROFILE_ANSWERS
from runner.selfcheck.report import GuaranteeResult, Status

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
