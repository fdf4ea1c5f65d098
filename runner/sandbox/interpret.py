"""From what a task container did to an :class:`ExecutionResult`.

Owns the mapping of the agent's error kinds and the container's facts (exit code,
OOM kill, host-side deadline, output cap, who killed the container) onto our
outcomes and their messages. n8n's exact texts are kept where users already search
for them (timeouts, security violations, SIGKILL, SystemExit); new failure classes
get clear texts of their own and a stable code.

Whose word counts (the audit record must not be writable by the audited):

- the host's own observations come first: its deadline, its output cap, the
  Docker daemon's OOM verdict (``State.OOMKilled``) and its record of kills;
- then the agent's own verdicts, each tied to what it measured (its ``source``):
  its pre-fork analysis (the only verdict besides the host analyzer's that may be
  stage ``analyze``, which continueOnFail leaves alone), the deadline it
  enforced, the bytes it counted on the result pipe, the exit it reaped;
- last the child's message, which task code can write itself: it may say that the
  task failed (its exception, a runtime guard's security violation, a syntax error
  found when compiling, SystemExit), all at stage ``run``; a child that claims what
  only the agent or the host can measure (a timeout, a kill, a crash, an output,
  memory or process limit) gets a user error saying so (:data:`CLAIM_MESSAGE`).

What stays agent-reported: the pids limit (``pidsLimitHit``, the agent's reading of
the cgroup's ``pids.events``): Docker keeps no record of it and the cgroup is gone
with the container. The task cannot write that file (cgroupfs is read-only) nor
the agent's envelope, so only a faulty agent could misreport it.

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
    PrintCaps,
    ResultEnvelope,
    decode_result,
    frame_complete,
)

# The kinds a child's message may name, and what they become (always stage run).
CHILD_KINDS = {
    "user_error": Outcome.USER_ERROR,
    "security_violation": Outcome.SECURITY_VIOLATION,
    "syntax_error": Outcome.SYNTAX_ERROR,
    "process_exit": Outcome.PROCESS_EXIT,
}
# What each of the agent's own sources may decide.
AGENT_KINDS: dict[str, frozenset[str]] = {
    "analysis": frozenset({"syntax_error", "security_violation"}),
    "deadline": frozenset({"timeout"}),
    "output_cap": frozenset({"output_limit_exceeded"}),
    "exit": frozenset({"killed", "crashed", "agent_error"}),
    "agent": frozenset({"agent_error", "invalid_task"}),
}
CLAIM_MESSAGE = "Task claimed an outcome that only the sandbox can decide: {kind}"
CLAIM_EXCERPT_CHARS = 500


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What the host saw of the task's process or container.

    ``outside_kill``: did the Docker daemon record a kill of the container (True),
    does its event record cover the container's life without one (False), or could
    that not be told (None: not asked, or the record is incomplete or unreadable).
    """

    exit_code: int | None
    timed_out: bool = False
    output_overflow: bool = False
    oom_killed: bool = False
    stderr_tail: str = ""
    outside_kill: bool | None = None


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


def killed_before_report(stdout: bytes, exit_code: int | None) -> bool:
    """Did the container die of a signal before a whole result frame arrived?

    Only then does it matter who sent the signal (:attr:`ProcessFacts.outside_kill`).
    """
    return _killed_by(exit_code) is not None and not frame_complete(stdout)


def interpret(
    stdout: bytes, facts: ProcessFacts, limits: Limits, *, max_print_calls: int
) -> ExecutionResult:
    """The one place where container facts and the agent's envelope become an outcome.

    ``max_print_calls`` (the task's guard setting) and ``limits.output_bytes`` cap the
    print entries kept, whatever the envelope carries.
    """
    if facts.timed_out:
        return _failed(
            Outcome.TIMEOUT, timeout_message(limits.timeout_s), details=_host("deadline")
        )
    if facts.output_overflow:
        return _failed(
            Outcome.OUTPUT_LIMIT,
            output_message(limits),
            "The task wrote more than the cap to stdout or stderr.",
            details=_host("output_cap"),
        )
    try:
        envelope = decode_result(stdout, PrintCaps(max_print_calls, limits.output_bytes))
    except AgentProtocolError as exc:
        return _without_envelope(exc, stdout, facts, limits)
    return _from_envelope(envelope, facts, limits)


def _host(what: str) -> dict[str, object]:
    return {"verdictSource": f"host:{what}"}


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
        return _failed(Outcome.MEMORY_LIMIT, memory_message(limits), details=_host("oom"))
    details: dict[str, object] = {"exitCode": facts.exit_code, "stderrTail": facts.stderr_tail}
    signum = _killed_by(facts.exit_code)
    if signum is not None and not frame_complete(stdout):
        # PID 1 (tini) ended with the agent's signal, or was killed itself, before the
        # agent could report. Not a framing fault; who sent it decides the text.
        return _killed_before_report(signum, facts.outside_kill, details)
    return _failed(
        Outcome.AGENT_ERROR,
        "Failed to read result from child process",
        str(exc),
        stage=Stage.RESULT,
        details=details,
    )


def _killed_before_report(
    signum: int, outside_kill: bool | None, details: dict[str, object]
) -> ExecutionResult:
    name = _signal_name(signum)
    details = {**details, "killedFromOutside": outside_kill}
    if outside_kill is False:
        # Tasks run as the agent's uid, so a task process can signal the agent (or
        # tini, which passes the signal on); the host and the daemon did not.
        return _failed(
            Outcome.CRASHED,
            f"Task killed its supervising agent ({name})",
            f"The agent that supervises the task and reports its result died of {name} "
            "before reporting. The host did not stop the container and the Docker daemon "
            "recorded no kill of it, so the signal came from inside the container, where "
            "only the task's own processes can send it (to the agent, or to tini, which "
            "passes it on).",
            details={**details, **_host("no_kill_recorded")},
        )
    if outside_kill:
        description = (
            "The container was stopped from outside the task (docker kill or stop, or the "
            "Docker daemon shutting down) before the agent could report a result."
        )
        source = "kill_recorded"
    else:
        description = (
            f"The agent died of {name} before it could report a result, and who sent the "
            "signal cannot be told: the Docker daemon's event record does not cover this "
            "container's life (it keeps only its last 256 events) or could not be read. "
            "A task process can signal the agent, and so can docker kill or stop."
        )
        source = "kill_unattributed"
    return _failed(
        Outcome.CRASHED,
        f"Task container was killed by {name}",
        description,
        details={**details, **_host(source)},
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
        # The agent's readings, kept as what they are: its claims.
        "agentOomKilled": stats.oom_killed,
        "agentPidsLimitHit": stats.pids_limit_hit,
        "printsReceived": envelope.prints_received,
        "printsDropped": envelope.prints_dropped,
        "agentPrintsDropped": stats.prints_dropped,
    }
    if stats.preloaded is not None:
        # Only a preloading slot says so: every other record keeps its shape.
        details["agentPreloaded"] = stats.preloaded
        details["agentPreloadMs"] = stats.preload_ms
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
    verdict = _classify(error, facts, stats, limits)
    details["verdictSource"] = verdict.source
    if verdict.claim is not None:
        details["childClaim"] = verdict.claim
    description = verdict.description
    if verdict.code is Outcome.CRASHED and not description:
        description = crash_report(facts.stderr_tail)
    return ExecutionResult(
        outcome=verdict.code,
        error=TaskError(
            verdict.code, verdict.message, description, verdict.stage, verdict.has_description
        ),
        prints=envelope.prints,
        details=details,
    )


@dataclass(frozen=True, slots=True)
class _Verdict:
    code: Outcome
    message: str
    description: str
    stage: Stage = Stage.RUN
    has_description: bool = True
    source: str = ""
    claim: str | None = None


def _classify(
    error: AgentError, facts: ProcessFacts, stats: AgentStats, limits: Limits
) -> _Verdict:
    kind, source = error.kind, error.source
    if source != "child" and kind not in AGENT_KINDS[source]:
        # The agent's own verdict must match what it measured: anything else is a fault.
        return _agent_fault(error, f"{kind} cannot come from the agent's {source}")
    verdict_source = "child" if source == "child" else f"agent:{source}"
    if source == "analysis":
        # The agent's pre-fork analysis: the only agent verdict at stage analyze.
        if kind == "syntax_error":
            return _Verdict(
                Outcome.SYNTAX_ERROR, error.message, "", Stage.ANALYZE, False, verdict_source
            )
        return _Verdict(
            Outcome.SECURITY_VIOLATION,
            error.message,
            error.description,
            Stage.ANALYZE,
            source=verdict_source,
        )
    if source == "agent" or (source == "exit" and kind == "agent_error"):
        return _agent_fault(error, f"{kind}: {error.message}")
    if facts.oom_killed and kind in ("killed", "crashed", "user_error"):
        # The host's own word (the daemon's OOM record), never the agent's stats.
        return _Verdict(
            Outcome.MEMORY_LIMIT, memory_message(limits), error.message, source="host:oom"
        )
    if kind in ("crashed", "user_error") and stats.pids_limit_hit:
        # Agent-reported (see the module docstring): the host has no view of pids.events.
        description = f"{error.message}\n\n{error.description}".strip()
        message = f"Task hit the process limit ({limits.pids} processes and threads)"
        return _Verdict(Outcome.PIDS_LIMIT, message, description, source="agent:pids_events")
    if source == "deadline":
        return _Verdict(
            Outcome.TIMEOUT, timeout_message(limits.timeout_s), "", source=verdict_source
        )
    if source == "output_cap":
        return _Verdict(
            Outcome.OUTPUT_LIMIT, error.message, error.description, source=verdict_source
        )
    if source == "exit":
        return _Verdict(Outcome.CRASHED, error.message, error.description, source=verdict_source)
    # The child's message: the task's own word, at stage run whatever it says.
    if kind in CHILD_KINDS:
        code = CHILD_KINDS[kind]
        if code is Outcome.SYNTAX_ERROR:
            return _Verdict(code, error.message, "", has_description=False, source="child")
        return _Verdict(code, error.message, error.description, source="child")
    return _Verdict(
        Outcome.USER_ERROR,
        CLAIM_MESSAGE.format(kind=kind),
        f"The task's own process reported {kind!r} "
        f"({_excerpt(error.message)}). Timeouts, kills, crashes and the output, memory "
        "and process limits are decided by the agent and the host from what they "
        "measure; they measured none of this, so it is reported as the task's own error.",
        source="child",
        claim=kind,
    )


def _agent_fault(error: AgentError, description: str) -> _Verdict:
    # invalid_task, agent_error, or a verdict that does not match its source: never
    # guess, report it.
    return _Verdict(
        Outcome.AGENT_ERROR,
        "Failed to read result from child process",
        description,
        Stage.RESULT,
        source=f"agent:{error.source}",
    )


def _excerpt(text: str) -> str:
    if len(text) <= CLAIM_EXCERPT_CHARS:
        return repr(text)
    return repr(text[:CLAIM_EXCERPT_CHARS]) + f" and {len(text) - CLAIM_EXCERPT_CHARS} more chars"
