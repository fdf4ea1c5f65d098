"""The agent's output is untrusted input: every malformed frame is a clear error, the
host caps the print entries whatever the agent sends, and no verdict is taken from a
source that cannot have measured it."""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any

import pytest

from runner.errors import AgentProtocolError
from runner.sandbox.base import GuardConfig, Limits, Mode, Outcome, Stage, TaskSpec
from runner.sandbox.envelope import HEADER, PrintCaps, decode_result, encode_task
from runner.sandbox.interpret import CLAIM_MESSAGE, ProcessFacts, interpret


def frame(document: object, prints: list[Any] | None = None) -> bytes:
    """A result frame: the envelope's JSON, then one line per print entry."""
    lines = [json.dumps(document).encode()]
    lines.extend(json.dumps(entry).encode() for entry in prints or [])
    body = b"\n".join(lines)
    return HEADER.pack(len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


GOOD = {"version": 2, "status": "success", "result": [1]}


def run(stdout: bytes, facts: ProcessFacts | None = None, **limits: Any) -> Any:
    return interpret(stdout, facts or ProcessFacts(0), Limits(**limits), max_print_calls=100)


def test_a_good_frame_decodes() -> None:
    envelope = decode_result(frame(GOOD, [["'a'"], ["1", "None"]]))
    assert envelope.result == [1]
    assert envelope.prints == [["'a'"], ["1", "None"]]
    assert (envelope.prints_received, envelope.prints_dropped) == (2, 0)


@pytest.mark.parametrize(
    ("stdout", "reason"),
    [
        pytest.param(b"", "no result", id="empty"),
        pytest.param(b"\x00\x00", "no result", id="short-header"),
        pytest.param(struct.pack(">I", 0), "zero length", id="zero-length"),
        pytest.param(frame(GOOD)[:-3], "truncated", id="truncated"),
        pytest.param(struct.pack(">I", 10**9) + b"{}", "truncated", id="wrong-length-prefix"),
        pytest.param(frame(GOOD) + frame(GOOD), "more than one", id="several-frames"),
        pytest.param(HEADER.pack(5) + b"{nope", "not valid UTF-8 JSON", id="invalid-json"),
        pytest.param(HEADER.pack(2) + b"\xff\xfe", "not valid UTF-8 JSON", id="invalid-utf8"),
        pytest.param(frame([1, 2]), "wrong shape", id="not-an-object"),
        pytest.param(frame({**GOOD, "version": 3}), "wrong shape", id="wrong-version"),
        pytest.param(frame(GOOD, [[1]]), "wrong shape", id="prints-not-strings"),
        pytest.param(frame(GOOD, ["x"]), "wrong shape", id="print-entry-not-a-list"),
        pytest.param(
            raw_frame(json.dumps(GOOD).encode() + b"\n{nope"),
            "not valid UTF-8 JSON",
            id="print-line-invalid",
        ),
        pytest.param(
            frame({**GOOD, "prints": [["'a'"]]}), "wrong shape", id="prints-inside-the-envelope"
        ),
        pytest.param(frame({"version": 2, "status": "error"}), "wrong shape", id="error-missing"),
        pytest.param(
            frame(
                {"version": 2, "status": "error", "error": {"kind": "user_error", "message": ""}}
            ),
            "wrong shape",
            id="error-without-source",
        ),
        pytest.param(
            frame({**GOOD, "version": 1, "prints": []}), "wrong shape", id="protocol-version-1"
        ),
    ],
)
def test_malformed_frames_are_agent_protocol_errors(stdout: bytes, reason: str) -> None:
    with pytest.raises(AgentProtocolError, match=reason):
        decode_result(stdout)


def test_malformed_output_becomes_a_clear_task_error_not_a_crash() -> None:
    result = run(b"garbage!")
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert result.error.message == "Failed to read result from child process"
    assert result.error.stage is Stage.RESULT


# -- print entries: capped on the host, with bounded work ------------------------------

FLOOD = 300_000


def test_a_flood_of_print_entries_keeps_the_cap_and_counts_the_rest() -> None:
    # Issue item 1: 300,000 empty entries (about 1 MB). The host keeps max-print-calls.
    stdout = raw_frame(json.dumps(GOOD).encode() + b"\n[]" * FLOOD)
    result = interpret(stdout, ProcessFacts(0), Limits(), max_print_calls=100)
    assert result.outcome is Outcome.SUCCESS
    assert result.prints[:100] == [[]] * 100
    assert result.prints[100:] == [[f"[Output truncated - {FLOOD - 100} more print statements]"]]
    assert result.details["printsReceived"] == FLOOD
    assert result.details["printsDropped"] == FLOOD - 100


def test_dropped_print_entries_are_counted_not_parsed() -> None:
    # Bounded work, measured as memory rather than time: parsing the flood into
    # objects costs tens of megabytes; counting its line breaks costs nothing.
    stdout = raw_frame(json.dumps(GOOD).encode() + b"\n[]" * FLOOD)
    tracemalloc.start()
    try:
        envelope = decode_result(stdout, PrintCaps(max_calls=100, max_bytes=1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert envelope.prints_dropped == FLOOD - 100
    assert peak < 256 * 1024, f"decoding allocated {peak} bytes at its peak"
    tracemalloc.start()
    try:
        json.loads(b"[" + b",".join([b"[]"] * FLOOD) + b"]")
        _, parsed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed_peak > 40 * peak  # what parsing the dropped entries would have cost


def test_print_text_past_the_output_cap_is_dropped_whole_entries() -> None:
    prints = [["a" * 40], ["b" * 40], ["c" * 40], ["d"]]
    envelope = decode_result(frame(GOOD, prints), PrintCaps(max_calls=100, max_bytes=100))
    assert envelope.prints == [
        ["a" * 40],
        ["b" * 40],
        ["[Output truncated - 2 more print statements]"],
    ]
    assert (envelope.prints_received, envelope.prints_dropped) == (4, 2)


def test_the_agents_own_truncation_marker_is_kept_after_the_cap() -> None:
    marker = ["[Output truncated - 7 more print statements]"]
    envelope = decode_result(frame(GOOD, [["x"]] * 3 + [marker]), PrintCaps(max_calls=3))
    assert envelope.prints == [["x"]] * 3 + [marker]
    assert envelope.prints_dropped == 0


def test_one_extra_entry_that_is_no_marker_is_dropped() -> None:
    envelope = decode_result(frame(GOOD, [["x"]] * 4), PrintCaps(max_calls=3))
    assert envelope.prints == [["x"]] * 3 + [["[Output truncated - 1 more print statements]"]]


def test_no_print_calls_allowed_keeps_none() -> None:
    envelope = decode_result(frame(GOOD, [["x"]] * 2), PrintCaps(max_calls=0))
    assert envelope.prints == [["[Output truncated - 2 more print statements]"]]


# -- whose word a verdict is -----------------------------------------------------------


def error_frame(kind: str, source: str, message: str = "m", **extra: Any) -> bytes:
    error = {"kind": kind, "message": message, "description": "d", "source": source, **extra}
    return frame({"version": 2, "status": "error", "error": error})


def test_the_agents_own_analysis_is_stage_analyze() -> None:
    result = run(error_frame("security_violation", "analysis", "Security violations detected"))
    assert result.outcome is Outcome.SECURITY_VIOLATION
    assert result.error is not None
    assert result.error.stage is Stage.ANALYZE
    assert result.details["verdictSource"] == "agent:analysis"


@pytest.mark.parametrize("message", ["Security violations detected", "Security violation detected"])
def test_a_childs_security_violation_is_stage_run_whatever_its_text(message: str) -> None:
    # Issue item 4: a frame the task wrote claiming the analyzer's verdict. Stage
    # analyze would skip continueOnFail; it is the task's own word, so stage run.
    result = run(error_frame("security_violation", "child", message))
    assert result.outcome is Outcome.SECURITY_VIOLATION
    assert result.error is not None
    assert result.error.stage is Stage.RUN
    assert result.details["verdictSource"] == "child"


def test_a_childs_syntax_error_is_stage_run() -> None:
    result = run(error_frame("syntax_error", "child", "invalid syntax (line 1)"))
    assert result.outcome is Outcome.SYNTAX_ERROR
    assert result.error is not None
    assert result.error.stage is Stage.RUN
    assert result.error.has_description is False


@pytest.mark.parametrize(
    "kind",
    [
        "timeout",
        "killed",
        "crashed",
        "output_limit_exceeded",
        "memory_limit_exceeded",
        "pids_limit_exceeded",
        "agent_error",
        "cancelled",
        "surprise",
    ],
)
def test_a_child_claiming_what_only_the_sandbox_measures_is_a_user_error(kind: str) -> None:
    result = run(error_frame(kind, "child", "Task execution timed out after 60 seconds"))
    assert result.outcome is Outcome.USER_ERROR
    assert result.error is not None
    assert result.error.message == CLAIM_MESSAGE.format(kind=kind)
    assert "Task execution timed out after 60 seconds" in result.error.description
    assert result.error.stage is Stage.RUN
    assert result.details["childClaim"] == kind


@pytest.mark.parametrize(
    ("kind", "source", "outcome"),
    [
        ("timeout", "deadline", Outcome.TIMEOUT),
        ("output_limit_exceeded", "output_cap", Outcome.OUTPUT_LIMIT),
        ("killed", "exit", Outcome.CRASHED),
        ("crashed", "exit", Outcome.CRASHED),
    ],
)
def test_the_agents_measured_verdicts_stand(kind: str, source: str, outcome: Outcome) -> None:
    result = run(error_frame(kind, source), timeout_s=7)
    assert result.outcome is outcome
    assert result.details["verdictSource"] == f"agent:{source}"
    if outcome is Outcome.TIMEOUT:
        assert result.error is not None
        # The runner's own text for its own limit, not the envelope's.
        assert result.error.message == "Task execution timed out after 7 seconds"


@pytest.mark.parametrize(
    ("kind", "source"),
    [
        ("timeout", "exit"),
        ("user_error", "deadline"),
        ("security_violation", "output_cap"),
        ("timeout", "analysis"),
        ("output_limit_exceeded", "agent"),
    ],
)
def test_an_agent_verdict_that_does_not_match_its_source_is_a_protocol_error(
    kind: str, source: str
) -> None:
    result = run(error_frame(kind, source))
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert result.error.stage is Stage.RESULT
    assert f"{kind} cannot come from the agent's {source}" in result.error.description


def test_an_agent_fault_is_not_guessed() -> None:
    result = run(error_frame("invalid_task", "agent", "'code' must be a string"))
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert "invalid_task: 'code' must be a string" in result.error.description


def test_missing_envelope_after_oom_kill_is_a_memory_error() -> None:
    result = run(b"", ProcessFacts(exit_code=137, oom_killed=True))
    assert result.outcome is Outcome.MEMORY_LIMIT


def with_stats(stdout_document: dict[str, Any], **stats: Any) -> bytes:
    return frame({**stdout_document, "stats": stats})


KILLED = {
    "version": 2,
    "status": "error",
    "error": {
        "kind": "killed",
        "message": "Process was forcefully killed (SIGKILL)",
        "description": "",
        "source": "exit",
    },
}
USER_ERROR = {
    "version": 2,
    "status": "error",
    "error": {"kind": "user_error", "message": "boom", "description": "", "source": "child"},
}


@pytest.mark.parametrize("document", [KILLED, USER_ERROR], ids=["killed", "user-error"])
def test_memory_limit_is_the_hosts_verdict_never_the_agents_stats(document: dict[str, Any]) -> None:
    claimed = run(with_stats(document, oomKilled=True))
    assert claimed.outcome is not Outcome.MEMORY_LIMIT
    assert claimed.details["agentOomKilled"] is True  # recorded, as a claim
    seen = run(frame(document), ProcessFacts(0, oom_killed=True))
    assert seen.outcome is Outcome.MEMORY_LIMIT
    assert seen.details["verdictSource"] == "host:oom"


def test_a_success_stays_a_success_whatever_the_stats_claim() -> None:
    result = run(with_stats(GOOD, oomKilled=True, pidsLimitHit=True))
    assert result.outcome is Outcome.SUCCESS


def test_a_killed_child_is_a_crash_with_n8ns_text() -> None:
    plain = run(frame(KILLED))
    assert plain.outcome is Outcome.CRASHED
    assert plain.error is not None
    assert plain.error.message == "Process was forcefully killed (SIGKILL)"


# -- a container that died before any frame: who sent the signal ------------------------


def test_a_kill_the_daemon_recorded_is_from_outside() -> None:
    result = run(b"", ProcessFacts(exit_code=137, outside_kill=True))
    assert result.outcome is Outcome.CRASHED
    assert result.error is not None
    assert result.error.message == "Task container was killed by SIGKILL"
    assert "stopped from outside the task" in result.error.description
    assert result.details["killedFromOutside"] is True


@pytest.mark.parametrize(("exit_code", "name"), [(137, "SIGKILL"), (143, "SIGTERM")])
def test_a_death_with_no_kill_recorded_is_the_tasks_doing(exit_code: int, name: str) -> None:
    # Issue item 4: the task (same uid) can kill its agent; that is not "from outside".
    result = run(b"", ProcessFacts(exit_code=exit_code, outside_kill=False))
    assert result.outcome is Outcome.CRASHED
    assert result.error is not None
    assert result.error.message == f"Task killed its supervising agent ({name})"
    assert "from outside" not in result.error.description
    assert result.details["verdictSource"] == "host:no_kill_recorded"


def test_a_death_nobody_can_attribute_says_so() -> None:
    result = run(b"", ProcessFacts(exit_code=137, outside_kill=None))
    assert result.outcome is Outcome.CRASHED
    assert result.error is not None
    assert result.error.message == "Task container was killed by SIGKILL"
    assert "cannot be told" in result.error.description


def test_task_envelope_carries_everything_the_agent_needs() -> None:
    spec = TaskSpec(
        task_id="t1",
        code="return 1",
        mode=Mode.PER_ITEM,
        items=[{"json": {}}],
        guards=GuardConfig(("json",), (), ("eval",), True, 100),
        query=None,
    )
    raw = encode_task(spec, Limits(timeout_s=3, output_bytes=4096))
    (length,) = HEADER.unpack_from(raw)
    document = json.loads(raw[HEADER.size :])
    assert length == len(raw) - HEADER.size
    assert document["mode"] == "per_item"
    assert document["guards"] == {
        "stdlibAllow": ["json"],
        "externalAllow": [],
        "builtinsDeny": ["eval"],
        "blockEnvAccess": True,
    }
    assert document["limits"] == {"timeoutS": 3, "outputBytes": 4096, "maxPrintCalls": 100}
