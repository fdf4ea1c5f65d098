"""The agent's output is untrusted input: every malformed frame is a clear error."""

from __future__ import annotations

import json
import struct

import pytest

from runner.errors import AgentProtocolError
from runner.sandbox.base import GuardConfig, Limits, Mode, Outcome, Stage, TaskSpec
from runner.sandbox.envelope import HEADER, decode_result, encode_task
from runner.sandbox.interpret import ProcessFacts, interpret


def frame(document: object) -> bytes:
    body = json.dumps(document).encode()
    return HEADER.pack(len(body)) + body


GOOD = {"version": 1, "status": "success", "result": [1], "prints": [["'a'"]]}


def test_a_good_frame_decodes() -> None:
    envelope = decode_result(frame(GOOD))
    assert envelope.result == [1]
    assert envelope.prints == [["'a'"]]


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
        pytest.param(frame({**GOOD, "version": 2}), "wrong shape", id="wrong-version"),
        pytest.param(frame({**GOOD, "prints": [[1]]}), "wrong shape", id="prints-not-strings"),
        pytest.param(frame({"version": 1, "status": "error"}), "wrong shape", id="error-missing"),
    ],
)
def test_malformed_frames_are_agent_protocol_errors(stdout: bytes, reason: str) -> None:
    with pytest.raises(AgentProtocolError, match=reason):
        decode_result(stdout)


def test_malformed_output_becomes_a_clear_task_error_not_a_crash() -> None:
    result = interpret(b"garbage!", ProcessFacts(exit_code=0), Limits())
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert result.error.message == "Failed to read result from child process"
    assert result.error.stage is Stage.RESULT


def test_missing_envelope_after_oom_kill_is_a_memory_error() -> None:
    result = interpret(b"", ProcessFacts(exit_code=137, oom_killed=True), Limits())
    assert result.outcome is Outcome.MEMORY_LIMIT


def test_unknown_error_kind_is_not_guessed() -> None:
    stdout = frame(
        {
            "version": 1,
            "status": "error",
            "error": {"kind": "surprise", "message": "m", "description": ""},
        }
    )
    result = interpret(stdout, ProcessFacts(exit_code=0), Limits())
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert "surprise" in result.error.description


def test_killed_child_with_oom_is_memory_limit_else_crash() -> None:
    killed = {
        "version": 1,
        "status": "error",
        "error": {
            "kind": "killed",
            "message": "Process was forcefully killed (SIGKILL)",
            "description": "",
        },
    }
    oom = interpret(frame({**killed, "stats": {"oomKilled": True}}), ProcessFacts(0), Limits())
    assert oom.outcome is Outcome.MEMORY_LIMIT
    plain = interpret(frame(killed), ProcessFacts(0), Limits())
    assert plain.outcome is Outcome.CRASHED
    assert plain.error is not None
    assert plain.error.message == "Process was forcefully killed (SIGKILL)"


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
