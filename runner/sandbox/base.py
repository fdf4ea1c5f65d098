"""The ``Sandbox`` seam and the values that cross it.

Owns: what a task is (:class:`TaskSpec`), the limits it runs under
(:class:`Limits`), and what comes back (:class:`ExecutionResult` with an
:class:`Outcome`). Outcomes are data: a timeout or an OOM kill is a normal result
of running hostile code, not an exception. Exceptions are kept for faults of the
runner and its infrastructure (:mod:`runner.errors`). Beside the seam, for the
self-check: which kernel answers a task (:class:`SandboxKernel`), and the limits the
host applied to a task's container (:class:`AppliedLimits`), from a sandbox that can
read them (:class:`HostLimitsView`).

Must not import docker, asyncio or pydantic: implementations (Docker, local
subprocess, fakes) import this, not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

JSON = Any  # a value that json.dumps accepts without a default hook

MIB = 1024 * 1024


class Mode(StrEnum):
    """How the code runs over the input items (n8n's ``nodeMode``)."""

    ALL_ITEMS = "all_items"
    PER_ITEM = "per_item"

    @property
    def n8n_name(self) -> str:
        return _N8N_MODES_BY_MODE[self]

    @classmethod
    def parse(cls, value: str) -> Mode:
        """Accept our names and n8n's (``runOnceForAllItems`` / ``runOnceForEachItem``)."""
        if value in _MODES_BY_N8N_NAME:
            return _MODES_BY_N8N_NAME[value]
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"Unknown nodeMode: {value}") from None


_N8N_MODES_BY_MODE = {Mode.ALL_ITEMS: "runOnceForAllItems", Mode.PER_ITEM: "runOnceForEachItem"}
_MODES_BY_N8N_NAME = {name: mode for mode, name in _N8N_MODES_BY_MODE.items()}


class Stage(StrEnum):
    """Where in the pipeline a task ended."""

    ANALYZE = "analyze"
    SETUP = "setup"
    RUN = "run"
    RESULT = "result"
    # The embedded broker's, before any runner had the task or while it was sent one.
    QUEUE = "queue"
    DISPATCH = "dispatch"


class Outcome(StrEnum):
    """How a task ended. Each failure value is also the stable error ``code``."""

    SUCCESS = "success"
    SECURITY_VIOLATION = "security_violation"
    SYNTAX_ERROR = "syntax_error"
    CODE_TOO_LARGE = "code_too_large"
    ANALYSIS_LIMIT = "analysis_limit_exceeded"
    USER_ERROR = "user_error"
    PROCESS_EXIT = "process_exit"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit_exceeded"
    PIDS_LIMIT = "pids_limit_exceeded"
    OUTPUT_LIMIT = "output_limit_exceeded"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    AGENT_ERROR = "agent_protocol_error"

    @property
    def is_success(self) -> bool:
        return self is Outcome.SUCCESS

    @property
    def error_code(self) -> ErrorCode:
        """This failure's error code (a success has none: ``ValueError``)."""
        return ErrorCode(self.value)


class ErrorCode(StrEnum):
    """Every error code the runner and its broker give: ``error.code`` of a result
    document, ``errorCode`` of an audit record, the ``error_code`` label of the metrics,
    and the ``code`` of each fault class of :mod:`runner.errors`.

    The documented contract: docs/protocol.md ("Error codes") lists every member, and
    README's "Error codes" only members (tests/unit/test_error_codes.py). An error code
    a runner *reports* is passed on as it came (another runner than ours may send its
    own); every code produced here is a member.
    """

    # The task's own failures: the failure outcomes, whose values are their codes.
    SECURITY_VIOLATION = Outcome.SECURITY_VIOLATION.value
    SYNTAX_ERROR = Outcome.SYNTAX_ERROR.value
    CODE_TOO_LARGE = Outcome.CODE_TOO_LARGE.value
    ANALYSIS_LIMIT = Outcome.ANALYSIS_LIMIT.value
    USER_ERROR = Outcome.USER_ERROR.value
    PROCESS_EXIT = Outcome.PROCESS_EXIT.value
    TIMEOUT = Outcome.TIMEOUT.value
    MEMORY_LIMIT = Outcome.MEMORY_LIMIT.value
    PIDS_LIMIT = Outcome.PIDS_LIMIT.value
    OUTPUT_LIMIT = Outcome.OUTPUT_LIMIT.value
    CRASHED = Outcome.CRASHED.value
    CANCELLED = Outcome.CANCELLED.value
    AGENT_ERROR = Outcome.AGENT_ERROR.value
    # Faults of the runner and of what it depends on (runner.errors: each class's code).
    RUNNER_ERROR = "runner_error"
    CONFIGURATION_ERROR = "configuration_error"
    INFRASTRUCTURE_ERROR = "infrastructure_error"
    DOCKER_UNAVAILABLE = "docker_unavailable"
    IMAGE_BUILD_FAILED = "image_build_failed"
    CONTAINER_SETUP_FAILED = "container_setup_failed"
    ISOLATION_NOT_ENFORCED = "isolation_not_enforced"
    BROKER_AUTH_FAILED = "broker_auth_failed"
    BROKER_UNAVAILABLE = "broker_unavailable"
    PROTOCOL_ERROR = "protocol_error"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    # The runner service's, for a task no sandbox report came back for.
    LIMIT_ABOVE_CEILING = "limit_above_ceiling"
    PROFILE_UNAVAILABLE = "profile_unavailable"
    INTERNAL_ERROR = "internal_error"
    # The embedded broker's.
    QUEUE_TIMEOUT = "queue_timeout"
    RUNNER_LOST = "runner_lost"
    OUTPUT_SCHEMA_VIOLATION = "output_schema_violation"
    DISPATCH_FAILED = "dispatch_failed"
    INVALID_REPORT = "invalid_report"
    TASK_ERROR = "task_error"  # a runner's error that came with no code of ours


NANOS_PER_CPU = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one task container. Bytes and seconds, units in the names.

    A value below :data:`MINIMUM_LIMITS` does not mean "a smaller limit" to every
    engine: ``NanoCpus`` 0 is *no* CPU limit, a tmpfs ``size=0`` is an unbounded one.
    Every place a limit enters (policy bundle, settings, the broker's per-task
    request, the HTTP API, the pipeline) refuses such a value; :meth:`below_minimum`
    names the offenders.
    """

    timeout_s: float = 60.0
    memory_bytes: int = 256 * MIB
    cpus: float = 1.0
    pids: int = 64
    tmpfs_bytes: int = 16 * MIB
    output_bytes: int = 16 * MIB
    nofile: int = 256
    fsize_bytes: int = 16 * MIB
    nproc: int = 4096
    # Largest task code the runner will parse (UTF-8 bytes): parsing costs the runner
    # ~3 us of CPU and ~500 bytes of memory per byte of code (policies/README.md 3.1).
    code_bytes: int = 256 * 1024

    @property
    def nano_cpus(self) -> int:
        """The CPU quota as Docker's ``NanoCpus``: rounded, never 0 (0 means unlimited).

        ``int(1e-10 * 1e9)`` is 0, and Docker reads a zero ``NanoCpus`` as "no limit";
        1 instead is refused by the daemon (its minimum is 0.01 CPU): fail closed.
        """
        return max(1, round(self.cpus * NANOS_PER_CPU))

    def below_minimum(self) -> list[str]:
        """``"name value < minimum"`` for every field under :data:`MINIMUM_LIMITS`."""
        names = [item.name for item in fields(self)]
        return [
            f"{name} {getattr(self, name):g} < {getattr(MINIMUM_LIMITS, name):g}"
            for name in names
            if getattr(self, name) < getattr(MINIMUM_LIMITS, name)
        ]

    def as_audit(self) -> dict[str, float | int]:
        return {
            "timeoutSeconds": self.timeout_s,
            "memoryBytes": self.memory_bytes,
            "cpus": self.cpus,
            # What the engine was asked to enforce, not only what was requested.
            "nanoCpus": self.nano_cpus,
            "pids": self.pids,
            "tmpfsBytes": self.tmpfs_bytes,
            "outputBytes": self.output_bytes,
            "nofile": self.nofile,
            "fsizeBytes": self.fsize_bytes,
            "nproc": self.nproc,
            "codeBytes": self.code_bytes,
        }


#: The least each limit may be, in :class:`Limits` units. These live in code, not in
#: the policy bundle, so that a bundle cannot lower its own floor. Each is explained
#: (and was measured) in policies/README.md section 3.1.
MINIMUM_LIMITS = Limits(
    timeout_s=1.0,  # a container does not even start faster than this
    memory_bytes=16 * MIB,  # Docker's minimum is 6 MiB; the agent and a trivial task need ~12
    cpus=0.01,  # Docker's minimum (1 ms of CFS quota per 100 ms period); below it 0 = unlimited
    pids=8,  # tini, the agent and the task child, with room to spare (3 is the measured floor)
    tmpfs_bytes=1 * MIB,  # a tmpfs size of 0 is an *unbounded* tmpfs
    output_bytes=4096,  # room for an error envelope
    nofile=32,  # runc itself needs ~11 descriptors to start the container
    fsize_bytes=1 * MIB,
    nproc=64,
    code_bytes=1024,
)

#: The most any bundle may let a task's code be, in bytes (lint rule
#: ``limits.above-maximum``): parsing 4 MiB already costs an analysis worker ~12 s of
#: CPU and ~2 GiB of memory.
MAXIMUM_CODE_BYTES = 4 * MIB


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The in-process guards the agent applies (speed bumps; the container is the wall)."""

    stdlib_allow: tuple[str, ...]
    external_allow: tuple[str, ...]
    builtins_deny: tuple[str, ...]
    block_env_access: bool = True
    max_print_calls: int = 100


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task as the sandbox receives it."""

    task_id: str
    code: str
    mode: Mode
    items: list[JSON]
    guards: GuardConfig
    query: JSON = None


@dataclass(frozen=True, slots=True)
class TaskError:
    """A task failure, with n8n's ``message``/``description`` texts and our stable code."""

    code: Outcome
    message: str
    description: str = ""
    stage: Stage = Stage.RUN
    # n8n sends no ``description`` key for a cancel or a syntax error.
    has_description: bool = True


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """What running a task produced. ``error`` is set exactly when ``outcome`` is a failure."""

    outcome: Outcome
    result: JSON = None
    error: TaskError | None = None
    prints: list[list[str]] = field(default_factory=list)
    container_id: str | None = None
    image_id: str | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    details: dict[str, JSON] = field(default_factory=dict)


class SandboxKernel(StrEnum):
    """Which kernel answers a task's system calls."""

    LINUX = "linux"  # the host's (runc, through Docker or directly)
    GVISOR = "gvisor"  # gVisor's sandbox kernel (runsc), between the task and the host


@dataclass(frozen=True, slots=True)
class AppliedLimits:
    """A container's resource limits as the host's kernel applies them: read on the
    host from the container's own cgroups while it runs, never from inside it (where
    a sandbox kernel such as gVisor's shows none of them). Each value is the text of
    its cgroup file, None where it could not be read.
    """

    cgroup: str  # the host's layout: "v2", "v1" or "hybrid"
    memory_limit: str | None  # memory.max (v2) or memory.limit_in_bytes (v1)
    pids_max: str | None
    cpu_quota: str | None  # cpu.max's quota ("max": none) or cpu.cfs_quota_us (-1: none)
    cpu_period: str | None
    # Room the engine gave the pids cgroup beside the task's own limit, for a sandbox
    # kernel's own threads (gVisor's); 0 when the cgroup counts the task's alone.
    pids_room: int = 0


class HostLimitsView(Protocol):
    """A sandbox that can tell the limits the host applied to a task's container:
    asked before the task runs, answered after (the self-check's canary)."""

    def observe_limits(self, task_id: str) -> None:
        """Read the applied limits of ``task_id``'s container on the host while it runs."""
        ...

    def observed_limits(self, task_id: str) -> AppliedLimits | None:
        """What was read for ``task_id`` (once); None: this engine has no such view."""
        ...


#: The error message of a task stopped by :meth:`Sandbox.cancel` (n8n's words).
CANCELLED_MESSAGE = "Task was cancelled"


def cancelled_result(prints: list[list[str]]) -> ExecutionResult:
    """What ``run`` returns for a task that :meth:`Sandbox.cancel` stopped: outcome
    ``cancelled`` (whatever the stopped code or its agent made of it), the prints kept."""
    error = TaskError(Outcome.CANCELLED, CANCELLED_MESSAGE, has_description=False)
    return ExecutionResult(outcome=Outcome.CANCELLED, error=error, prints=prints)


class Sandbox(Protocol):
    """Runs one task in isolation. Implementations: the container engines
    (:mod:`runner.sandbox.docker`, :mod:`runner.sandbox.oci`), the agent as a host
    process (:mod:`runner.sandbox.process`, ``bench/forkserver``: tests and benchmarks
    only), and fakes for unit tests.

    The whole seam is these three methods: the service uses nothing else. A sandbox that
    retries its own set-up is told whom to tell of each retry by its constructor (an
    ``on_retry`` callable taking the cause: the service's metrics), not through the seam.
    """

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        """Run ``spec`` under ``limits``; raise only for infrastructure faults."""
        ...

    async def cancel(self, task_id: str) -> bool:
        """Stop the task ``task_id``: its ``run`` then returns :func:`cancelled_result`.

        True when its code was running and was stopped; False when nothing of it runs
        here (unknown, finished, or not started yet: a cancel that comes before its
        ``run`` has started the code stops it as soon as it starts). Never raises for
        an unknown task.
        """
        ...

    async def aclose(self) -> None:
        """Release resources (clients, pools)."""
        ...
