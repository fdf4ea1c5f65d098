"""From what a task container did to an :class:`ExecutionResult`.

Owns the mapping of the agent's error kinds and the container's facts (exit code,
OOM kill, host-side deadline, output cap) onto our outcomes and their messages.
n8n's exact texts are kept where users already search for them (timeouts,
security violations, SIGKILL, SystemExit); new failure classes get clear texts of
their own and a stable code.

Shared by every sandbox implementation that runs the real agent.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from runner.errors import AgentProtocolError
from runner.sandbox.base import (
    MIB,
    ExecutionResult,
    Limits,
    Outcome,
    Stage,
    TaskError,
)
from runner.sandbox.envelope import (
    AgentError,
    AgentStats,
    ResultEnvelope,
    decode_result,
    frame_complete,
)

STATIC_VIOLATION_MESSAGE = "Security violations detected"


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What the host saw of the task's process or container."""

    exit_code: int | None
    timed_out: bool = False
    output_overflow: bool = False
    oom_killed: bool = False
    stderr_tail: str = ""


def timeout_message(timeout_s: float) -> str:
    """n8n's exact text ("second" when N is 1)."""
    seconds: float = int(timeout_s) if float(timeout_s).is_integer() else timeout_s
    unit = "second" if seconds == 1 else "seconds"
    return f"Task execution timed out after {seconds} {unit}"


def memory_message(limits: Limits) -> str:
    return f"Task ran out of memory (limit {limits.memory_bytes // MIB} MiB)"


def output_message(limits: Limits) -> str:
    return f"Task output exceeded the limit of {limits.output_bytes} bytes"


USER_FILENAMES = ("<all_items_task_execution>", "<per_item_task_execution>")


def crash_report(stderr_tail: str) -> str:
    """The user's part of a faulthandler dump: the fatal error line and the user's frames."""
    lines = stderr_tail.splitlines()
    fatal = [line for line in lines if line.startswith("Fatal Python error:")]
    if not fatal:
        return ""
    start = len(lines) - 1 - lines[::-1].index(fatal[-1])
    frames = [line for line in lines[start:] if any(name in line for name in USER_FILENAMES)]
    return "\n".join([fatal[-1], *frames])


def interpret(stdout: bytes, facts: ProcessFacts, limits: Limits) -> ExecutionResult:
    """The one place where container facts and the agent's envelope become an outcome."""
    if facts.timed_out:
        return _failed(Outcome.TIMEOUT, timeout_message(limits.timeout_s))
    if facts.output_overflow:
        return _failed(
            Outcome.OUTPUT_LIMIT,
            output_message(limits),
            "The task wrote more than the cap to stdout or stderr.",
        )
    try:
        envelope = decode_result(stdout)
    except AgentProtocolError as exc:
        return _without_envelope(exc, stdout, facts, limits)
    return _from_envelope(envelope, facts, limits)


def _failed(
    code: Outcome,
    message: str,
    description: str = "",
    *,
    stage: Stage = Stage.RUN,
    prints: list[list[str]] | None = None,
    has_description: bool = True,
    details: dict[str, object] | None = None,
) -> ExecutionResult:
    return ExecutionResult(
        outcome=code,
        error=TaskError(code, message, description, stage, has_description),
        prints=prints or [],
        details=dict(details or {}),
    )


def _without_envelope(
    exc: AgentProtocolError, stdout: bytes, facts: ProcessFacts, limits: Limits
) -> ExecutionResult:
    if facts.oom_killed:
        # The agent itself was killed: the task took all the memory before it could report.
        return _failed(Outcome.MEMORY_LIMIT, memory_message(limits))
    details: dict[str, object] = {"exitCode": facts.exit_code, "stderrTail": facts.stderr_tail}
    signum = _killed_by(facts.exit_code)
    if signum is not None and not frame_complete(stdout):
        # PID 1 (tini) died of a signal before the agent could report: the task's uid
        # cannot signal tini or the agent, so this came from outside the container
        # (``docker kill``/``stop``, the daemon shutting down). Not a framing fault.
        return _failed(
            Outcome.CRASHED,
            f"Task container was killed by {_signal_name(signum)}",
            "The container was stopped from outside the task (docker kill or stop, or the "
            "Docker daemon shutting down) before the agent could report a result.",
            details=details,
        )
    return _failed(
        Outcome.AGENT_ERROR,
        "Failed to read result from child process",
        str(exc),
        stage=Stage.RESULT,
        details=details,
    )


def _killed_by(exit_code: int | None) -> int | None:
    """The signal behind a container exit code of 128 + N (the shell convention)."""
    if exit_code is None or not 128 < exit_code < 128 + 65:
        return None
    return exit_code - 128


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _from_envelope(
    envelope: ResultEnvelope, facts: ProcessFacts, limits: Limits
) -> ExecutionResult:
    stats = envelope.stats
    details: dict[str, object] = {
        "childExitCode": stats.child_exit_code,
        "agentRunMs": stats.run_ms,
        "agentUndumpable": stats.agent_undumpable,
    }
    if envelope.status == "success":
        return ExecutionResult(
            outcome=Outcome.SUCCESS,
            result=envelope.result,
            prints=envelope.prints,
            details=details,
        )
    assert envelope.error is not None  # checked by decode_result
    error = envelope.error
    if error.stderr:
        details["stderr"] = error.stderr
    oom = bool(stats.oom_killed) or facts.oom_killed
    code, message, description, stage, has_description = _classify(error, oom, stats, limits)
    if code is Outcome.CRASHED and not description:
        description = crash_report(facts.stderr_tail)
    return ExecutionResult(
        outcome=code,
        error=TaskError(code, message, description, stage, has_description),
        prints=envelope.prints,
        details=details,
    )


def _classify(
    error: AgentError, oom: bool, stats: AgentStats, limits: Limits
) -> tuple[Outcome, str, str, Stage, bool]:
    pids_hit = bool(stats.pids_limit_hit)
    kind = error.kind
    if kind == "security_violation":
        static = error.message == STATIC_VIOLATION_MESSAGE
        stage = Stage.ANALYZE if static else Stage.RUN
        return Outcome.SECURITY_VIOLATION, error.message, error.description, stage, True
    if kind == "syntax_error":
        return Outcome.SYNTAX_ERROR, error.message, "", Stage.ANALYZE, False
    if kind in ("killed", "user_error", "crashed") and oom:
        return Outcome.MEMORY_LIMIT, memory_message(limits), error.message, Stage.RUN, True
    if kind in ("user_error", "crashed") and pids_hit:
        description = f"{error.message}\n\n{error.description}".strip()
        message = f"Task hit the process limit ({limits.pids} processes and threads)"
        return Outcome.PIDS_LIMIT, message, description, Stage.RUN, True
    simple = {
        "user_error": Outcome.USER_ERROR,
        "process_exit": Outcome.PROCESS_EXIT,
        "timeout": Outcome.TIMEOUT,
        "killed": Outcome.CRASHED,
        "crashed": Outcome.CRASHED,
        "output_limit_exceeded": Outcome.OUTPUT_LIMIT,
    }
    if kind in simple:
        return simple[kind], error.message, error.description, Stage.RUN, True
    # invalid_task, agent_error or a kind we do not know: never guess, report it.
    return (
        Outcome.AGENT_ERROR,
        "Failed to read result from child process",
        f"{kind}: {error.message}",
        Stage.RESULT,
        True,
    )
