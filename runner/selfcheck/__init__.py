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

from runner.selfcheck.cache import SelfCheckCache, default_cache_dir
from runner.selfcheck.canaries import CANARY_GUARDS, FACTS_CANARY, MEMORY_CANARY
from runner.selfcheck.report import GuaranteeResult, SelfCheckReport, Status
from runner.selfcheck.run import SelfCheckTarget, ensure_selfcheck, run_selfcheck
from runner.selfcheck.verdicts import CanaryOutcome, evaluate

__all__ = [
    "CANARY_GUARDS",
    "FACTS_CANARY",
    "MEMORY_CANARY",
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
