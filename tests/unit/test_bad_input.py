"""Bad input, generated: the analyzer, the wire codec and the agent's result framing
take anything (arbitrary text, random bytes, nesting deeper than any stack, huge
literals) and answer with a verdict or one of our own errors: never another
exception, never a hang (each example has a deadline; the module a timeout).
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner.analyzer import Analyzer, ImportPolicy, Verdict
from runner.errors import AgentProtocolError, ProtocolError
from runner.protocol.codec import decode_broker_message, decode_runner_message, encode
from runner.protocol.messages import (
    BROKER_MESSAGE_TYPES,
    RUNNER_MESSAGE_TYPES,
    TaskSettingsMessage,
)
from runner.sandbox.base import ExecutionResult, Limits, Outcome, Stage
from runner.sandbox.envelope import HEADER, PrintCaps, decode_result
from runner.sandbox.interpret import ProcessFacts, interpret

pytestmark = pytest.mark.timeout(120)

POLICY = ImportPolicy(frozenset({"json", "math", "re"}), frozenset())
FUZZ = settings(
    max_examples=150,
    # No per-example deadline: a busy machine is not a bug; pytest-timeout catches hangs.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Deep nesting of every kind the parser and the JSON decoder recurse on.
NESTINGS = {
    "parens": ("(" * 10_000) + "1" + (")" * 10_000),
    "lists": ("[" * 10_000) + ("]" * 10_000),
    "dicts": ("{1:" * 10_000) + "1" + ("}" * 10_000),
    "calls": ("f(" * 10_000) + (")" * 10_000),
    "unary": ("-" * 100_000) + "1",
    "not": ("not " * 50_000) + "x",
    "lambdas": ("lambda: " * 10_000) + "1",
    "attributes": "x" + (".a" * 100_000),
    "subscripts": "x" + ("[0]" * 50_000),
    "additions": "+".join(["1"] * 100_000),
    "string-additions": "+".join(["'ab'"] * 50_000),
    "ifs": "".join(" " * i + "if x:\n" for i in range(200)) + " " * 200 + "pass\n",
    "fstrings": "f'{" * 200 + "1" + "}'" * 200,
}

HUGE_LITERALS = {
    "int": "return " + "9" * 1_000_000,
    "string": "return '" + "a" * 5_000_000 + "'",
    "bytes": "return b'" + "a" * 5_000_000 + "'",
    "list": "return [" + "1," * 100_000 + "]",
    "dict": "return {" + ",".join(f"{i}: {i}" for i in range(20_000)) + "}",
    "float": "return 1e" + "9" * 100_000,
    # Concatenated literals: the analyzer folds them to scan the result; every
    # intermediate sum must not cost quadratic time or memory.
    "concatenation": "return " + "+".join(["'" + "a" * 1000 + "'"] * 2000),
    "format-template": "return '" + "{0:" * 5000 + "}" * 5000 + "'",
}


def analyzer() -> Analyzer:
    return Analyzer(POLICY)


def assert_verdict(verdict: Verdict) -> None:
    assert isinstance(verdict, Verdict)
    if verdict.syntax_error is not None:
        assert isinstance(verdict.syntax_error, str)
        assert verdict.violations == ()


# -- the analyzer -----------------------------------------------------------------------


@FUZZ
@given(st.text())
@example("\x00")
@example("\ud800")  # a lone surrogate
@example("return '''")
@example("\r\n\r" * 100)
def test_the_analyzer_gives_a_verdict_on_any_text(code: str) -> None:
    assert_verdict(analyzer().check(code))


@FUZZ
@given(st.binary(max_size=4096))
def test_the_analyzer_gives_a_verdict_on_random_bytes_as_text(raw: bytes) -> None:
    for text in (raw.decode("latin-1"), raw.decode("utf-8", "surrogateescape")):
        assert_verdict(analyzer().check(text))


def python_like() -> st.SearchStrategy[str]:
    """Fragments of real Python, shuffled: more of them get past the parser."""
    atoms = st.sampled_from(
        [
            "x",
            "1",
            "'s'",
            "'{0.__class__}'",
            "__import__",
            "__class__",
            "os",
            "_items",
            "f'{x}'",
            "None",
            "...",
        ]
    )
    joins = st.sampled_from(
        [" + ", ".", "(", ")", "[", "]", ", ", ": ", " if ", " else ", "\n", " = ", "\n    "]
    )
    keywords = st.sampled_from(
        [
            "import os\n",
            "from . import x\n",
            "def f(__builtins__):\n    return 1\n",
            "class A:\n    pass\n",
            "global __builtins__\n",
            "match x:\n    case A(a):\n        pass\n",
            "try:\n    pass\nexcept Exception as __class__:\n    pass\n",
            "'{}'.format\n",
            "return ",
            "lambda: ",
        ]
    )
    return st.lists(st.one_of(atoms, joins, keywords), max_size=60).map("".join)


@FUZZ
@given(python_like())
def test_the_analyzer_gives_a_verdict_on_python_like_fragments(code: str) -> None:
    assert_verdict(analyzer().check(code))


# A hang guard (pytest-timeout), not a speed target: a verdict must come at all.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", NESTINGS.values(), ids=NESTINGS.keys())
def test_deep_nesting_is_a_verdict(code: str) -> None:
    assert_verdict(analyzer().check(code))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", HUGE_LITERALS.values(), ids=HUGE_LITERALS.keys())
def test_huge_literals_are_a_verdict(code: str) -> None:
    assert_verdict(analyzer().check(code))


def test_a_huge_concatenation_is_rejected_not_folded_without_bound() -> None:
    # 2,000 literals of 1,000 characters: every intermediate sum would add up to 2e9
    # characters. The analyzer stops folding at its budget and says so.
    code = "return " + "+".join(["'" + "a" * 1000 + "'"] * 2000)
    verdict = analyzer().check(code)
    assert [str(v) for v in verdict.violations] == [
        "Line 1: String concatenation too large to analyze; build long strings another "
        "way (for example with ''.join)."
    ]


def test_a_dangerous_attribute_split_across_concatenated_literals_is_still_found() -> None:
    verdict = analyzer().check("return ('{0.__cla' + 'ss__}').format(1)")
    assert any("__class__" in str(v) for v in verdict.violations)


# -- the wire codec ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


def frames() -> st.SearchStrategy[str | bytes]:
    known = sorted(BROKER_MESSAGE_TYPES | RUNNER_MESSAGE_TYPES)
    shaped = st.builds(
        lambda type_, fields: json.dumps({"type": type_, **fields}),
        st.sampled_from([*known, "runner:unknown", ""]),
        st.dictionaries(
            st.sampled_from(
                ["taskId", "offerId", "validFor", "settings", "data", "error", "types", "name"]
            ),
            json_values,
        ),
    )
    return st.one_of(
        st.text(),
        st.binary(),
        json_values.map(json.dumps),
        shaped,
        shaped.map(str.encode),
    )


def decode_or_protocol_error(decode: Any, frame: str | bytes) -> None:
    try:
        message = decode(frame)
    except ProtocolError:
        return
    # What decodes encodes again (the models are the wire).
    assert json.loads(encode(message))["type"] == message.type


@FUZZ
@given(frames())
@example("[" * 100_000)
@example(b"\xff\xfe")
@example("{" + '"a":' * 50_000 + "1" + "}" * 50_000)
@example('{"type": "broker:taskofferaccept", "taskId": [' * 1000)
@example("9" * 100_000)
@example('{"type": "broker:tasksettings", "taskId": "t", "settings": ' + "[" * 5000 + "]" * 5000)
def test_the_codec_decodes_or_raises_a_protocol_error(frame: str | bytes) -> None:
    decode_or_protocol_error(decode_broker_message, frame)
    decode_or_protocol_error(decode_runner_message, frame)


any_text = st.text(
    st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
)
texts_and_values = st.recursive(
    st.none() | st.integers() | any_text,
    lambda children: st.lists(children) | st.dictionaries(any_text, children),
    max_leaves=20,
)


@FUZZ
@given(any_text, texts_and_values)
@example("\ud800", {"\udfff": ["\udbff\udc00", "\ud800x"]})  # a pair, and lone ones
def test_every_message_encodes_to_a_sendable_frame_that_decodes_to_itself(
    task_id: str, value: Any
) -> None:
    # Lone surrogates come from callers (``"\\ud800"`` is valid JSON): a frame that
    # UTF-8 cannot encode would fail in the socket's writer, and take it down.
    message = TaskSettingsMessage(task_id=task_id, settings={"code": task_id, "items": value})
    frame = encode(message)
    frame.encode("utf-8")
    decoded = decode_broker_message(frame)
    # The same message, except that JSON reads an escaped surrogate *pair* as the one
    # character it encodes; so the round trip is exact from then on.
    assert encode(decoded) == frame or decoded == message
    assert encode(decode_broker_message(encode(decoded))) == encode(decoded)


def test_a_lone_surrogate_survives_the_wire_unchanged() -> None:
    message = TaskSettingsMessage(task_id="t", settings={"code": "\ud800", "items": ["\udfffx"]})
    frame = encode(message)
    frame.encode("utf-8")
    assert decode_broker_message(frame) == message


# -- the agent's result framing ---------------------------------------------------------


def framed(body: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(len(body) if length is None else length) + body


def stdouts() -> st.SearchStrategy[bytes]:
    envelope = st.fixed_dictionaries(
        {"version": st.sampled_from([1, 2, "1"]), "status": st.sampled_from(["success", "error"])},
        optional={
            "result": json_values,
            "error": st.dictionaries(
                st.sampled_from(["kind", "message", "description", "source", "signal", "exitCode"]),
                json_values,
            ),
            "prints": json_values,
            "stats": json_values,
        },
    ).map(lambda d: json.dumps(d).encode())
    # Print entries travel as lines after the envelope: valid ones, and anything else.
    print_lines = st.lists(
        st.one_of(
            st.lists(st.text(max_size=8), max_size=3).map(lambda e: json.dumps(e).encode()),
            st.binary(max_size=16),
        ),
        max_size=5,
    )
    envelope = st.one_of(
        envelope,
        st.tuples(envelope, print_lines).map(lambda t: b"\n".join([t[0], *t[1]])),
    )
    bodies = st.one_of(st.binary(max_size=512), envelope)
    return st.one_of(
        st.binary(max_size=1024),
        bodies.map(framed),
        st.tuples(bodies, st.integers(0, 2**32 - 1)).map(lambda t: framed(t[0], t[1])),
        st.lists(bodies.map(framed), min_size=2, max_size=3).map(b"".join),
        st.tuples(bodies.map(framed), st.binary(min_size=1, max_size=64)).map(b"".join),
    )


@FUZZ
@given(stdouts())
@example(framed(b"[" * 100_000))
@example(framed(b'{"version": 2, "status": "success", "result": ' + b"[" * 100_000))
@example(framed(b'{"version": 2, "status": "success"}\n' + b"[" * 100_000))
def test_the_result_decoder_decodes_or_raises_an_agent_protocol_error(stdout: bytes) -> None:
    try:
        envelope = decode_result(stdout, PrintCaps(max_calls=3, max_bytes=16))
    except AgentProtocolError:
        return
    assert (envelope.status == "error") == (envelope.error is not None)
    # The host's caps hold whatever the frame carried: 3 entries of at most 16 bytes of
    # text in all, then at most one truncation marker.
    assert len(envelope.prints) <= 4
    kept = envelope.prints
    marker = r"\[Output truncated - \d+ more print statements\]"
    if kept and kept[-1] and re.fullmatch(marker, kept[-1][0]):
        kept = kept[:-1]
    assert len(kept) <= 3
    assert sum(len(arg.encode("utf-8", "surrogatepass")) for e in kept for arg in e) <= 16


@FUZZ
@given(
    stdouts(),
    st.one_of(st.none(), st.integers(-1, 300)),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.text(max_size=200),
)
def test_any_agent_output_and_container_facts_become_one_outcome(
    stdout: bytes,
    exit_code: int | None,
    timed_out: bool,
    overflow: bool,
    oom: bool,
    stderr: str,
) -> None:
    facts = ProcessFacts(exit_code, timed_out, overflow, oom, stderr)
    result = interpret(stdout, facts, Limits(), max_print_calls=3)
    assert isinstance(result, ExecutionResult)
    assert (result.error is None) == (result.outcome is Outcome.SUCCESS)


# -- a fake agent: every way its framing can be wrong -----------------------------------

GOOD = json.dumps({"version": 2, "status": "success", "result": 1}).encode()


@pytest.mark.parametrize(
    ("stdout", "hint"),
    [
        pytest.param(framed(GOOD, len(GOOD) + 10), "truncated", id="length-prefix-too-long"),
        pytest.param(framed(GOOD, len(GOOD) - 3), "more than one", id="length-prefix-too-short"),
        pytest.param(framed(GOOD)[:-1], "truncated", id="truncated-frame"),
        pytest.param(framed(GOOD)[:2], "no result", id="truncated-header"),
        pytest.param(framed(b'{"version": 2, "status": '), "not valid", id="invalid-json"),
        pytest.param(framed(GOOD) * 2, "more than one", id="two-frames"),
        pytest.param(
            b"Traceback (most recent call last):\n",
            "length prefix says 1416782179 bytes",  # "Trac" read as a length
            id="garbage-on-stdout",
        ),
        pytest.param(
            b"hello" + framed(GOOD),
            "length prefix says 1751477356 bytes",  # "hell" read as a length
            id="garbage-before-the-frame",
        ),
        pytest.param(framed(GOOD) + b"\n", "more than one", id="garbage-after-the-frame"),
        pytest.param(framed(b"[" * 100_000), "not valid", id="nesting-deeper-than-the-stack"),
        pytest.param(struct.pack(">I", 2**32 - 1), "truncated", id="length-prefix-4-gib"),
    ],
)
@pytest.mark.parametrize("exit_code", [0, 1, None])
def test_a_fake_agents_broken_framing_is_an_agent_protocol_error(
    stdout: bytes, hint: str, exit_code: int | None
) -> None:
    result = interpret(stdout, ProcessFacts(exit_code=exit_code), Limits(), max_print_calls=100)
    assert result.outcome is Outcome.AGENT_ERROR
    assert result.error is not None
    assert result.error.code is Outcome.AGENT_ERROR
    assert result.error.stage is Stage.RESULT
    assert result.error.message == "Failed to read result from child process"
    assert hint in result.error.description


@pytest.mark.parametrize(("exit_code", "name"), [(137, "SIGKILL"), (143, "SIGTERM")])
def test_a_container_killed_from_outside_before_any_frame_is_a_crash(
    exit_code: int, name: str
) -> None:
    # The daemon recorded the kill (DockerSandbox reads its events): from outside.
    facts = ProcessFacts(exit_code=exit_code, outside_kill=True)
    result = interpret(b"", facts, Limits(), max_print_calls=100)
    assert result.outcome is Outcome.CRASHED
    assert result.error is not None
    assert result.error.message == f"Task container was killed by {name}"
    assert result.error.stage is Stage.RUN


def test_a_complete_but_broken_frame_stays_an_agent_error_even_when_killed() -> None:
    # A whole frame arrived: whatever killed the container, the frame is what is judged.
    result = interpret(framed(b"{nope"), ProcessFacts(exit_code=137), Limits(), max_print_calls=100)
    assert result.outcome is Outcome.AGENT_ERROR
