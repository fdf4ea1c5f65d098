"""The self-check's logic without Docker: evaluating canary facts, failing closed,
and caching (in memory and on disk) so that it costs nothing per task.

The canaries themselves run against the real engine in
``tests/integration/test_selfcheck.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import IsolationNotEnforcedError
from runner.policy import EffectivePolicy, load_policy
from runner.sandbox.base import (
    AppliedLimits,
    ExecutionResult,
    Limits,
    Outcome,
    SandboxKernel,
    TaskError,
    TaskSpec,
)
from runner.selfcheck import (
    CANARY_GUARDS,
    FACTS_CANARY,
    MEMORY_CANARY,
    CanaryOutcome,
    SelfCheckCache,
    SelfCheckTarget,
    Status,
    ensure_selfcheck,
    evaluate,
    run_selfcheck,
)
from runner.settings import Settings

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def policy() -> EffectivePolicy:
    return load_policy(Settings())


def good_facts(policy: EffectivePolicy) -> dict[str, Any]:
    """What the facts canary reports in a container that holds every guarantee."""
    limits = policy.canary_limits()
    return {
        "uid": 10001,
        "gid": 10001,
        "seccomp": "2",
        "no_new_privs": "1",
        "no_new_privs_prctl": 1,
        "cap_eff": "0000000000000000",
        "cap_prm": "0000000000000000",
        "cap_bnd": "0000000000000000",
        "cap_amb": "0000000000000000",
        "cap_inh": "0000000000000000",
        "interfaces": ["lo"],
        "syscalls": {
            "io_uring_setup": "EPERM",
            "ptrace_peekdata": "EPERM",
            "socket_af_vsock": "EPERM",
            "clone3": "ENOSYS",
        },
        "apparmor": None,
        "memory_limit": str(limits.memory_bytes),
        "pids_max": str(limits.pids),
        "nproc": [4096, 4096],
        "root_mount": "ro,relatime",
        "root_write": "EROFS",
        # tini, the agent and the task child, then threads until the limit refuses one.
        "tasks_before": 3,
        "threads_started": limits.pids - 3,
        "thread_refused": "RuntimeError: can't start new thread",
        # Docker: quota = NanoCpus * period / 1e9 (1 CPU: 100000 us per 100000 us).
        "cpu": {
            "cgroup": "v1",
            "quota": str(limits.nano_cpus * 100_000 // 1_000_000_000),
            "period": "100000",
        },
    }


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def read_text(path: Path) -> str:
    return path.read_text()


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


OOM = CanaryOutcome(Outcome.MEMORY_LIMIT, None, "memory_limit_exceeded: out of memory")


def statuses(results: tuple[Any, ...]) -> dict[str, Status]:
    return {result.name: result.status for result in results}


def test_every_guarantee_passes_on_good_facts(policy: EffectivePolicy) -> None:
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, good_facts(policy)), OOM, policy, apparmor_profile=None
    )
    found = statuses(results)
    assert [result.name for result in results] == [
        *policy.bundle.config.selfcheck.required,
        *policy.bundle.config.selfcheck.optional,
    ]
    assert found.pop("apparmor") is Status.NOT_AVAILABLE
    assert set(found.values()) == {Status.PASS}


def _set(facts: dict[str, Any], key: str, value: Any) -> None:
    if "." in key:
        outer, inner = key.split(".")
        facts[outer] = {**facts[outer], inner: value}
    else:
        facts[key] = value


@pytest.mark.parametrize(
    ("guarantee", "key", "value"),
    [
        ("seccomp-filter", "seccomp", "0"),
        ("seccomp-profile", "syscalls.io_uring_setup", "EFAULT"),  # Docker's default
        ("seccomp-profile", "syscalls.ptrace_peekdata", "ESRCH"),
        ("seccomp-profile", "syscalls.socket_af_vsock", "EINVAL"),
        ("seccomp-profile", "syscalls.clone3", "EPERM"),
        ("no-new-privileges", "no_new_privs", "0"),
        ("no-new-privileges", "no_new_privs", None),  # a missing line proves nothing
        ("no-new-privileges", "no_new_privs_prctl", 0),
        ("capabilities-dropped", "cap_eff", "00000000a80425fb"),
        ("capabilities-dropped", "cap_bnd", "00000000a80425fb"),
        ("capabilities-dropped", "cap_amb", None),  # under Linux the line is there
        ("network-none", "interfaces", ["eth0", "lo"]),
        ("read-only-rootfs", "root_write", "written"),
        ("read-only-rootfs", "root_write", "EACCES"),  # a permission, not the mount
        ("read-only-rootfs", "root_mount", "rw,relatime"),
        ("non-root-user", "uid", 0),
        ("non-root-user", "gid", 0),
        ("memory-limit", "memory_limit", "9223372036854771712"),  # no limit
        ("pids-limit", "pids_max", "max"),
        ("pids-limit", "thread_refused", None),
        # Stopped before the limit: something else refused (a refused clone3 did).
        ("pids-limit", "threads_started", 0),
        ("pids-limit", "tasks_before", None),
        ("cpu-limit", "cpu.quota", "-1"),  # v1: unlimited (what cpus 1e-10 gave)
        ("cpu-limit", "cpu.quota", "max"),  # v2: unlimited
        ("cpu-limit", "cpu.quota", "50000"),  # half the policy's quota
        ("cpu-limit", "cpu.quota", None),  # unreadable
        ("cpu-limit", "cpu", None),  # an older canary, no CPU facts at all
    ],
)
def test_each_guarantee_fails_on_its_own_fact(
    policy: EffectivePolicy, guarantee: str, key: str, value: Any
) -> None:
    facts = good_facts(policy)
    _set(facts, key, value)
    results = evaluate(CanaryOutcome(Outcome.SUCCESS, facts), OOM, policy, apparmor_profile=None)
    failed = {name for name, status in statuses(results).items() if status is Status.FAIL}
    assert failed == {guarantee}


def test_cpu_limit_reads_cgroup_v2_too(policy: EffectivePolicy) -> None:
    facts = good_facts(policy)
    quota = policy.canary_limits().nano_cpus * 100_000 // 1_000_000_000
    facts["cpu"] = {"cgroup": "v2", "quota": str(quota), "period": "100000"}
    results = evaluate(CanaryOutcome(Outcome.SUCCESS, facts), OOM, policy, apparmor_profile=None)
    cpu = next(result for result in results if result.name == "cpu-limit")
    assert cpu.status is Status.PASS
    assert cpu.required
    assert f"cgroup v2: CFS quota {quota} us per 100000 us" in cpu.detail


def test_the_facts_canary_detects_the_cgroup_version_at_run_time() -> None:
    # Both layouts are in the canary; which one is read is decided inside the container.
    assert '"/sys/fs/cgroup/cgroup.controllers"' in FACTS_CANARY
    assert "cpu.max" in FACTS_CANARY
    assert "cpu.cfs_quota_us" in FACTS_CANARY
    assert "cpu.cfs_period_us" in FACTS_CANARY


def test_memory_limit_fails_when_the_memory_canary_is_not_killed(
    policy: EffectivePolicy,
) -> None:
    survived = CanaryOutcome(Outcome.SUCCESS, {"allocatedMb": 256})
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, good_facts(policy)), survived, policy, apparmor_profile=None
    )
    memory = next(r for r in results if r.name == "memory-limit")
    assert memory.status is Status.FAIL
    assert "allocated 256 MiB past a 64 MiB limit" in memory.detail


def test_apparmor_passes_only_when_our_profile_confines_the_task(policy: EffectivePolicy) -> None:
    facts = good_facts(policy)
    facts["apparmor"] = "sandbox-task (enforce)"
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, facts), OOM, policy, apparmor_profile="sandbox-task"
    )
    assert statuses(results)["apparmor"] is Status.PASS
    facts["apparmor"] = "docker-default (enforce)"
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, facts), OOM, policy, apparmor_profile="sandbox-task"
    )
    assert statuses(results)["apparmor"] is Status.FAIL


def test_a_canary_that_did_not_run_fails_every_guarantee(policy: EffectivePolicy) -> None:
    crashed = CanaryOutcome(Outcome.CRASHED, None, "crashed: Task process crashed")
    results = evaluate(crashed, OOM, policy, apparmor_profile=None)
    found = statuses(results)
    assert found.pop("apparmor") is Status.NOT_AVAILABLE
    assert set(found.values()) == {Status.FAIL}
    assert "the canary did not run: crashed" in results[0].detail


# -- the host's view, and gVisor -------------------------------------------------------------


def host_view(policy: EffectivePolicy, **changes: Any) -> AppliedLimits:
    """What the host reads of a canary container's cgroups under runc (hybrid layout)."""
    limits = policy.canary_limits()
    read = AppliedLimits(
        cgroup="hybrid",
        memory_limit=str(limits.memory_bytes),
        pids_max=str(limits.pids),
        cpu_quota="100000",
        cpu_period="100000",
    )
    return AppliedLimits(**{**{f: getattr(read, f) for f in read.__slots__}, **changes})


def test_the_hosts_reading_must_agree_under_linux_too(policy: EffectivePolicy) -> None:
    facts = CanaryOutcome(Outcome.SUCCESS, good_facts(policy))
    results = evaluate(facts, OOM, policy, apparmor_profile=None, host=host_view(policy))
    assert {s for name, s in statuses(results).items() if name != "apparmor"} == {Status.PASS}
    memory = next(r for r in results if r.name == "memory-limit")
    assert "on the host 67108864" in memory.detail
    for field, value, guarantee in [
        ("memory_limit", "9223372036854771712", "memory-limit"),
        ("pids_max", "max", "pids-limit"),
        ("cpu_quota", "-1", "cpu-limit"),
    ]:
        results = evaluate(
            facts, OOM, policy, apparmor_profile=None, host=host_view(policy, **{field: value})
        )
        failed = {name for name, status in statuses(results).items() if status is Status.FAIL}
        assert failed == {guarantee}, field


def gvisor_facts() -> dict[str, Any]:
    """The facts canary's report under runsc 20221219 (Debian 12), recorded on this
    project's host with the policy's canary limits (64 MiB, 32 pids)."""
    return {
        "uid": 10001,
        "gid": 10001,
        "seccomp": "2",
        "no_new_privs": None,  # gVisor's /proc/self/status has no such line
        "no_new_privs_prctl": 1,
        "cap_eff": "0000000000000000",
        "cap_prm": "0000000000000000",
        "cap_bnd": "0000000000000000",
        "cap_amb": None,  # nor this one
        "cap_inh": "0000000000000000",
        "interfaces": ["lo"],
        "syscalls": {
            "io_uring_setup": "EPERM",
            "ptrace_peekdata": "EPERM",
            "socket_af_vsock": "EPERM",
            "clone3": "ENOSYS",
        },
        "apparmor": None,
        "memory_limit": None,  # gVisor's /sys/fs/cgroup is empty
        "pids_max": None,
        "nproc": [32, 32],
        "root_mount": "ro",
        "cpu": {"cgroup": "v1", "quota": None, "period": None},
        "root_write": "EACCES",
        "tasks_before": 3,
        "threads_started": 29,
        "thread_refused": "RuntimeError: can't start new thread",
    }


GVISOR_HOST = AppliedLimits(
    cgroup="hybrid",
    memory_limit="67108864",
    pids_max="288",
    cpu_quota="100000",
    cpu_period="100000",
    pids_room=256,
)


def gvisor(
    policy: EffectivePolicy, facts: dict[str, Any], host: AppliedLimits | None = GVISOR_HOST
) -> dict[str, Any]:
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, facts),
        OOM,
        policy,
        apparmor_profile=None,
        kernel=SandboxKernel.GVISOR,
        host=host,
    )
    return {result.name: result for result in results}


def test_every_guarantee_is_proven_on_gvisors_recorded_facts(policy: EffectivePolicy) -> None:
    found = gvisor(policy, gvisor_facts())
    assert found.pop("apparmor").status is Status.NOT_AVAILABLE
    assert {name: r.status for name, r in found.items()} == dict.fromkeys(found, Status.PASS)
    assert "prctl(PR_GET_NO_NEW_PRIVS): 1" in found["no-new-privileges"].detail
    assert "CapPrm 0 proves it empty" in found["capabilities-dropped"].detail
    assert "mount at / is ro; writing / gave EACCES" in found["read-only-rootfs"].detail
    assert "on the host (cgroup hybrid): memory limit 67108864" in found["memory-limit"].detail
    assert "OOM-killed" in found["memory-limit"].detail
    assert "RLIMIT_NPROC [32, 32]" in found["pids-limit"].detail
    assert "pids.max 288 (canary 32 + 256" in found["pids-limit"].detail
    assert "CFS quota 100000 us per 100000 us" in found["cpu-limit"].detail


def test_under_linux_rules_gvisors_facts_prove_nothing_they_do_not_show(
    policy: EffectivePolicy,
) -> None:
    # What the self-check said of gVisor before it knew which kernel answered: the
    # missing lines and cgroups fail, they never pass by default.
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, gvisor_facts()), OOM, policy, apparmor_profile=None
    )
    failed = {name for name, status in statuses(results).items() if status is Status.FAIL}
    assert failed == {
        "no-new-privileges",
        "capabilities-dropped",
        "read-only-rootfs",
        "memory-limit",
        "pids-limit",
        "cpu-limit",
    }


def test_without_a_host_view_gvisors_limits_are_not_proven(policy: EffectivePolicy) -> None:
    found = gvisor(policy, gvisor_facts(), host=None)
    failed = {name for name, r in found.items() if r.status is Status.FAIL}
    assert failed == {"memory-limit", "pids-limit", "cpu-limit"}
    assert "no host view" in found["memory-limit"].detail


@pytest.mark.parametrize(
    ("guarantee", "key", "value"),
    [
        ("seccomp-profile", "syscalls.clone3", "EPERM"),
        ("no-new-privileges", "no_new_privs_prctl", 0),
        ("no-new-privileges", "no_new_privs", "0"),  # a line that is there must say 1
        ("capabilities-dropped", "cap_prm", "00000000a80425fb"),
        ("capabilities-dropped", "cap_amb", "0000000000000400"),
        ("read-only-rootfs", "root_mount", "rw"),
        ("read-only-rootfs", "root_write", "written"),
        # The sandbox kernel's RLIMIT_NPROC not set: nothing stops the thread loop.
        ("pids-limit", "nproc", [4096, 4096]),
        ("pids-limit", "thread_refused", None),
    ],
)
def test_each_gvisor_guarantee_fails_on_its_own_fact(
    policy: EffectivePolicy, guarantee: str, key: str, value: Any
) -> None:
    facts = gvisor_facts()
    _set(facts, key, value)
    failed = {name for name, r in gvisor(policy, facts).items() if r.status is Status.FAIL}
    assert failed == {guarantee}


def test_gvisor_before_the_fix_fails_its_thread_loop(policy: EffectivePolicy) -> None:
    # Recorded on b3a21b2: clone3 answered EPERM (runsc ignored the rule's errnoRet), so
    # not one thread started. A loop refused at once is no proof of a pids limit.
    facts = {**gvisor_facts(), "nproc": [4096, 4096], "threads_started": 0}
    facts["syscalls"] = {**facts["syscalls"], "clone3": "EPERM"}
    found = gvisor(policy, facts)
    failed = {name for name, r in found.items() if r.status is Status.FAIL}
    assert failed == {"seccomp-profile", "pids-limit"}
    assert "3 tasks + 0 threads started" in found["pids-limit"].detail


@pytest.mark.parametrize(
    ("field", "value", "guarantee"),
    [
        ("memory_limit", "9223372036854771712", "memory-limit"),  # no memory limit
        ("pids_max", "max", "pids-limit"),
        ("pids_max", "32", "pids-limit"),  # no room for the sandbox kernel's threads
        ("cpu_quota", "-1", "cpu-limit"),
    ],
)
def test_gvisors_limits_fail_on_the_hosts_reading(
    policy: EffectivePolicy, field: str, value: str, guarantee: str
) -> None:
    host = AppliedLimits(
        **{**{f: getattr(GVISOR_HOST, f) for f in GVISOR_HOST.__slots__}, field: value}
    )
    failed = {
        name for name, r in gvisor(policy, gvisor_facts(), host).items() if r.status is Status.FAIL
    }
    assert failed == {guarantee}


def test_gvisors_memory_limit_needs_the_memory_canary_killed_too(policy: EffectivePolicy) -> None:
    survived = CanaryOutcome(Outcome.SUCCESS, {"allocatedMb": 256})
    results = evaluate(
        CanaryOutcome(Outcome.SUCCESS, gvisor_facts()),
        survived,
        policy,
        apparmor_profile=None,
        kernel=SandboxKernel.GVISOR,
        host=GVISOR_HOST,
    )
    assert statuses(results)["memory-limit"] is Status.FAIL


# -- running through a pipeline and a (fake) sandbox ---------------------------------------


class CanarySandbox:
    """Answers the two canaries like a real container would (or worse, on demand)."""

    def __init__(self, policy: EffectivePolicy, **fact_changes: Any) -> None:
        self.facts = {**good_facts(policy), **fact_changes}
        self.canary_limits = policy.canary_limits()
        self.runs: list[str] = []
        self.host = host_view(policy)
        self.observing: set[str] = set()
        self.observed: dict[str, AppliedLimits] = {}
        self.observed_canaries: list[str] = []
        # The memory canary's outcomes, in order, before the real one (memory_limit).
        self.memory_outcomes: list[Outcome] = []

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        assert spec.guards == CANARY_GUARDS  # the in-process guards are off
        assert limits == self.canary_limits
        if spec.task_id in self.observing:
            self.observed[spec.task_id] = self.host
            self.observed_canaries.append("facts" if spec.code == FACTS_CANARY else "memory")
        if spec.code == FACTS_CANARY:
            self.runs.append("facts")
            assert spec.items == [{"json": {"threadCap": limits.pids * 4}}]
            return ExecutionResult(Outcome.SUCCESS, result=dict(self.facts))
        assert spec.code == MEMORY_CANARY
        self.runs.append("memory")
        if self.memory_outcomes:
            outcome = self.memory_outcomes.pop(0)
            if outcome is Outcome.SUCCESS:
                return ExecutionResult(outcome, result={"allocatedMb": 256})
            return ExecutionResult(outcome, error=TaskError(outcome, "killed (SIGKILL)"))
        error = TaskError(Outcome.MEMORY_LIMIT, "Task ran out of memory (limit 64 MiB)")
        return ExecutionResult(Outcome.MEMORY_LIMIT, error=error)

    async def cancel(self, task_id: str) -> bool:
        return False  # every canary ends at once

    async def aclose(self) -> None:
        return None

    def observe_limits(self, task_id: str) -> None:
        self.observing.add(task_id)

    def observed_limits(self, task_id: str) -> AppliedLimits | None:
        return self.observed.pop(task_id, None)


def target(
    policy: EffectivePolicy,
    sandbox: CanarySandbox,
    daemon_id: str = "D1",
    *,
    kernel: SandboxKernel = SandboxKernel.LINUX,
    host_view: bool = False,
) -> SelfCheckTarget:
    return SelfCheckTarget(
        sandbox=sandbox,
        policy=policy,
        apparmor_profile=None,
        daemon={"id": daemon_id, "serverVersion": "20.10.24"},
        image="sandbox-runner-task:test",
        image_id="sha256:image",
        kernel=kernel,
        host_view=sandbox if host_view else None,
    )


async def test_run_selfcheck_runs_both_canaries_through_the_pipeline(
    policy: EffectivePolicy,
) -> None:
    sandbox = CanarySandbox(policy)
    report = await run_selfcheck(target(policy, sandbox))
    assert sorted(sandbox.runs) == ["facts", "memory"]
    assert report.is_ok
    assert report.policy_sha256 == policy.sha256
    assert report.daemon_id == "D1"
    assert report.in_force()["apparmor"] == "not-available"
    assert [r.name for r in report.missing_optional] == ["apparmor"]
    audit = report.audit()
    assert audit["policySha256"] == policy.sha256
    assert audit["inForce"]["seccomp-profile"] == "pass"


async def test_a_memory_canary_that_crashed_is_run_once_more_before_any_verdict(
    policy: EffectivePolicy,
) -> None:
    # Killed, but not seen as out of memory: inconclusive (an engine's OOM record can be
    # missing on a loaded host), so once more; the second answer decides.
    sandbox = CanarySandbox(policy)
    sandbox.memory_outcomes = [Outcome.CRASHED]
    report = await run_selfcheck(target(policy, sandbox))
    assert sorted(sandbox.runs) == ["facts", "memory", "memory"]
    assert report.in_force()["memory-limit"] == "pass"
    # Crashed twice: a failure, and no third run.
    sandbox = CanarySandbox(policy)
    sandbox.memory_outcomes = [Outcome.CRASHED, Outcome.CRASHED]
    report = await run_selfcheck(target(policy, sandbox))
    assert sorted(sandbox.runs) == ["facts", "memory", "memory"]
    assert report.in_force()["memory-limit"] == "fail"


async def test_a_memory_canary_that_allocated_past_the_limit_fails_at_once(
    policy: EffectivePolicy,
) -> None:
    sandbox = CanarySandbox(policy)
    sandbox.memory_outcomes = [Outcome.SUCCESS]
    report = await run_selfcheck(target(policy, sandbox))
    assert sorted(sandbox.runs) == ["facts", "memory"]  # never run again
    assert report.in_force()["memory-limit"] == "fail"


async def test_the_host_view_is_asked_about_the_facts_canary_only(
    policy: EffectivePolicy,
) -> None:
    sandbox = CanarySandbox(policy)
    sandbox.host = host_view(policy, memory_limit="9223372036854771712")
    report = await run_selfcheck(target(policy, sandbox, host_view=True))
    assert sandbox.observed_canaries == ["facts"]
    assert sandbox.observed == {}  # taken, once
    assert [r.name for r in report.missing_required] == ["memory-limit"]
    assert "on the host 9223372036854771712" in report.missing_required[0].detail


async def test_the_cache_key_changes_with_the_sandbox_kernel(policy: EffectivePolicy) -> None:
    sandbox = CanarySandbox(policy)
    linux = target(policy, sandbox).cache_key
    assert linux != target(policy, sandbox, kernel=SandboxKernel.GVISOR).cache_key


async def test_ensure_fails_closed_and_caches_nothing(
    policy: EffectivePolicy, tmp_path: Path
) -> None:
    weak = CanarySandbox(policy, seccomp="0")
    cache = SelfCheckCache(tmp_path)
    with pytest.raises(IsolationNotEnforcedError) as caught:
        await ensure_selfcheck(target(policy, weak), cache=cache)
    assert "seccomp-filter (Seccomp: 0" in str(caught.value)
    assert caught.value.code == "isolation_not_enforced"
    assert cache_files(tmp_path) == []
    with pytest.raises(IsolationNotEnforcedError):  # and it runs again next time
        await ensure_selfcheck(target(policy, weak), cache=cache)
    assert weak.runs.count("facts") == 2


async def test_ensure_caches_per_daemon_and_policy(policy: EffectivePolicy, tmp_path: Path) -> None:
    sandbox = CanarySandbox(policy)
    cache = SelfCheckCache(tmp_path)
    first = await ensure_selfcheck(target(policy, sandbox), cache=cache)
    assert not first.cached
    second = await ensure_selfcheck(target(policy, sandbox), cache=cache)
    assert second.cached
    assert sandbox.runs.count("facts") == 1  # the second call cost nothing

    # A new process (a new cache object) finds it on disk.
    files = cache_files(tmp_path)
    assert len(files) == 1
    assert mode_of(files[0]) == 0o600
    from_disk = await ensure_selfcheck(target(policy, sandbox), cache=SelfCheckCache(tmp_path))
    assert from_disk.cached
    assert from_disk.in_force() == first.in_force()
    assert sandbox.runs.count("facts") == 1

    # Another daemon, or refresh=True, runs the canaries again.
    await ensure_selfcheck(target(policy, sandbox, daemon_id="D2"), cache=cache)
    assert sandbox.runs.count("facts") == 2
    await ensure_selfcheck(target(policy, sandbox), cache=cache, refresh=True)
    assert sandbox.runs.count("facts") == 3


async def test_cache_key_changes_with_the_policy(policy: EffectivePolicy, tmp_path: Path) -> None:
    other = load_policy(Settings(policy_dir=Path(__file__).parents[1] / "fixtures" / "good_policy"))
    sandbox = CanarySandbox(policy)
    assert target(policy, sandbox).cache_key != target(other, sandbox).cache_key


async def test_a_tampered_or_foreign_cache_file_is_ignored(
    policy: EffectivePolicy, tmp_path: Path
) -> None:
    sandbox = CanarySandbox(policy)
    await ensure_selfcheck(target(policy, sandbox), cache=SelfCheckCache(tmp_path))
    (path,) = cache_files(tmp_path)
    document = json.loads(read_text(path))
    document["guarantees"][0]["status"] = "fail"  # a stored failure is never trusted
    write_text(path, json.dumps(document))
    await ensure_selfcheck(target(policy, sandbox), cache=SelfCheckCache(tmp_path))
    write_text(path, "{not json")
    await ensure_selfcheck(target(policy, sandbox), cache=SelfCheckCache(tmp_path))
    assert sandbox.runs.count("facts") == 3


async def test_cache_without_a_directory_is_memory_only(policy: EffectivePolicy) -> None:
    sandbox = CanarySandbox(policy)
    cache = SelfCheckCache(None)
    await ensure_selfcheck(target(policy, sandbox), cache=cache)
    assert (await ensure_selfcheck(target(policy, sandbox), cache=cache)).cached
    assert sandbox.runs.count("facts") == 1


async def test_a_missing_optional_guarantee_is_logged(
    policy: EffectivePolicy, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = CanarySandbox(policy)
    cache = SelfCheckCache(None)
    with caplog.at_level("INFO", logger="runner.selfcheck"):
        await ensure_selfcheck(target(policy, sandbox), cache=cache)
        await ensure_selfcheck(target(policy, sandbox), cache=cache)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "optional" in r.getMessage()]
    assert said == [
        (
            "WARNING",
            "optional isolation guarantee apparmor is not-available: host kernel has no AppArmor",
        ),
        (
            "INFO",
            "optional isolation guarantee apparmor is not-available: host kernel has no AppArmor",
        ),
    ]
