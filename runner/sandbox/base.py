"""The ``Sandbox`` seam and the values that cross it.

Owns: what a task is (:class:`TaskSpec`), the limits it runs under
(:class:`Limits`), and what comes back (:class:`ExecutionResult` with an
:class:`Outcome`). Outcomes are data: a timeout or an OOM kill is a normal result
of running hostile code, not an exception. Exceptions are kept for faults of the
runner and its infrastructure (:mod:`runner.errors`).

Must not import docker, asyncio or pydantic: implementations (Docker, local
subprocess, fakes) import this, not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


class Outcome(StrEnum):
    """How a task ended. Each failure value is also the stable error ``code``."""

    SUCCESS = "success"
    SECURITY_VIOLATION = "security_violation"
    SYNTAX_ERROR = "syntax_error"
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


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one task container. Bytes and seconds, units in the names."""

    timeout_s: float = 60.0
    memory_bytes: int = 256 * MIB
    cpus: float = 1.0
    pids: int = 64
    tmpfs_bytes: int = 16 * MIB
    output_bytes: int = 16 * MIB
    nofile: int = 256
    fsize_bytes: int = 16 * MIB
    nproc: int = 4096

    def as_audit(self) -> dict[str, float | int]:
        return {
            "timeoutSeconds": self.timeout_s,
            "memoryBytes": self.memory_bytes,
            "cpus": self.cpus,
            "pids": self.pids,
            "tmpfsBytes": self.tmpfs_bytes,
            "outputBytes": self.output_bytes,
            "nofile": self.nofile,
            "fsizeBytes": self.fsize_bytes,
            "nproc": self.nproc,
        }


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


class Sandbox(Protocol):
    """Runs one task in isolation. Implementations: Docker, and fakes for unit tests."""

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        """Run ``spec`` under ``limits``; raise only for infrastructure faults."""
        ...

    async def aclose(self) -> None:
        """Release resources (clients, pools)."""
        ...
