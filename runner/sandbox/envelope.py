"""The runner's side of the agent protocol: task envelope out, result envelope in.

Framing: a 4-byte unsigned big-endian length, then UTF-8 JSON (see
``sandbox_image/agent/sandbox_agent/protocol.py`` for the agent's side). The result
frame's body is lines: the envelope's JSON object, then one print entry (a JSON
array of strings) per line.

The agent runs next to hostile code, so its output is **untrusted input**: the
result envelope is parsed with a strict pydantic model, exactly one frame must be
present, and every way it can be wrong becomes an :class:`AgentProtocolError` with
a reason (wrong length prefix, truncated frame, invalid JSON, several frames,
wrong shape). Nothing here trusts a length it has not checked against the cap.

Print entries are capped here, on the host, whatever the agent did: at most the
task's print calls and at most the output cap of print text are kept, the rest is
counted and dropped (n8n's truncation marker says how many). The cap costs bounded
work: entries past it are found by their line breaks and counted, never parsed, so
a hostile frame of 300,000 empty entries costs a byte count, not 300,000 objects.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import AgentProtocolError
from runner.sandbox.base import MIB, Limits, TaskSpec

HEADER = struct.Struct(">I")
# 2: print entries are lines after the envelope, and every error names its source.
PROTOCOL_VERSION = 2
# n8n's marker, as the agent's print capture ends its entries when it dropped calls.
_TRUNCATION_MARKER = re.compile(r"\[Output truncated - \d+ more print statements\]")
MARKER_LINE_MAX_BYTES = 128


@dataclass(frozen=True, slots=True)
class PrintCaps:
    """What the host keeps of a task's print entries (n8n's defaults)."""

    max_calls: int = 100
    max_bytes: int = 16 * MIB


def encode_task(spec: TaskSpec, limits: Limits) -> bytes:
    """The framed task envelope the agent reads from its stdin."""
    document = {
        "version": PROTOCOL_VERSION,
        "taskId": spec.task_id,
        "code": spec.code,
        "mode": spec.mode.value,
        "items": spec.items,
        "query": spec.query,
        "guards": {
            "stdlibAllow": list(spec.guards.stdlib_allow),
            "externalAllow": list(spec.guards.external_allow),
            "builtinsDeny": list(spec.guards.builtins_deny),
            "blockEnvAccess": spec.guards.block_env_access,
        },
        "limits": {
            "timeoutS": limits.timeout_s,
            "outputBytes": limits.output_bytes,
            "maxPrintCalls": spec.guards.max_print_calls,
        },
    }
    try:
        body = json.dumps(
            document, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except UnicodeEncodeError:
        # Items with a lone surrogate cannot be UTF-8; as ASCII escapes they reach the
        # agent unchanged (its json.loads turns them back into the same strings).
        text = json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        body = text.encode("ascii")
    return HEADER.pack(len(body)) + body


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# Who decided an error (the agent's module docstring): the agent's own verdicts
# (its pre-fork analysis, the deadline it enforced, the output it counted, the exit
# it reaped, its own faults) or the child's message, which is the task's own word.
Source = Literal["analysis", "deadline", "output_cap", "exit", "agent", "child"]


class AgentError(_Strict):
    kind: str = Field(max_length=64)
    message: str
    description: str = ""
    source: Source
    stderr: str = ""
    signal: int | None = None
    exit_code: int | None = Field(None, alias="exitCode")


class AgentStats(_Strict):
    child_exit_code: int | None = Field(None, alias="childExitCode")
    run_ms: float | None = Field(None, alias="runMs")
    # The agent's readings of the cgroup's counters: claims, recorded; the memory
    # verdict is the host's (interpret.py), the pids one has no host view.
    oom_killed: bool | None = Field(None, alias="oomKilled")
    pids_limit_hit: bool | None = Field(None, alias="pidsLimitHit")
    agent_undumpable: bool | None = Field(None, alias="agentUndumpable")
    prints_dropped: int | None = Field(None, alias="printsDropped")
    # A warm slot's agent: the modules it imported before its task, and how long that
    # took (absent: it was asked to preload nothing).
    preloaded: list[str] | None = None
    preload_ms: float | None = Field(None, alias="preloadMs")


class ResultEnvelope(_Strict):
    version: Literal[2]
    status: Literal["success", "error"]
    result: Any = None
    error: AgentError | None = None
    stats: AgentStats = Field(default_factory=AgentStats)
    # Not on the wire inside the envelope: set by :func:`decode_result` from the
    # print lines that follow it, after the host's cap.
    prints: list[list[str]] = Field(default_factory=list)
    prints_received: int = 0
    prints_dropped: int = 0


def frame_complete(data: bytes | bytearray) -> bool:
    """Has a whole length-prefixed frame arrived at the start of ``data``?"""
    if len(data) < HEADER.size:
        return False
    length: int = HEADER.unpack_from(data)[0]
    return len(data) >= HEADER.size + length


def _wrong_shape(hint: str) -> AgentProtocolError:
    return AgentProtocolError("Agent result envelope has the wrong shape", hint=hint)


def decode_result(stdout: bytes, caps: PrintCaps | None = None) -> ResultEnvelope:
    """Parse the agent's stdout: exactly one frame holding one valid result envelope,
    its print entries capped by ``caps`` (n8n's defaults when not given)."""
    caps = caps or PrintCaps()
    if len(stdout) < HEADER.size:
        raise AgentProtocolError(
            "Agent produced no result",
            hint=f"{len(stdout)} bytes on stdout, a frame needs at least {HEADER.size}",
        )
    (length,) = HEADER.unpack_from(stdout)
    end = HEADER.size + length
    if length == 0:
        raise AgentProtocolError("Agent result frame has a zero length prefix")
    if len(stdout) < end:
        raise AgentProtocolError(
            "Agent result frame is truncated",
            hint=f"length prefix says {length} bytes, {len(stdout) - HEADER.size} arrived",
        )
    if len(stdout) > end:
        raise AgentProtocolError(
            "Agent wrote more than one result frame",
            hint=f"{len(stdout) - end} bytes follow the first frame",
        )
    first_break = stdout.find(b"\n", HEADER.size, end)
    envelope_end = end if first_break < 0 else first_break
    document = _json(stdout[HEADER.size : envelope_end], "Agent result is not valid UTF-8 JSON")
    if isinstance(document, dict) and not {
        "prints",
        "prints_received",
        "prints_dropped",
    }.isdisjoint(document):
        raise _wrong_shape("print entries travel as lines after the envelope, not inside it")
    try:
        envelope = ResultEnvelope.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise _wrong_shape(f"{where}: {first['msg']}") from exc
    if (envelope.status == "error") != (envelope.error is not None):
        raise _wrong_shape("'error' must be present exactly when status is 'error'")
    if first_break < 0:
        return envelope
    prints = _capped_prints(stdout, first_break + 1, end, caps)
    return envelope.model_copy(
        update={
            "prints": prints.entries,
            "prints_received": prints.received,
            "prints_dropped": prints.dropped,
        }
    )


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the decoder's stack, from a hostile agent.
        raise AgentProtocolError(what, hint=str(exc)) from exc


@dataclass(frozen=True, slots=True)
class _Prints:
    entries: list[list[str]]
    received: int
    dropped: int


def _capped_prints(data: bytes, start: int, end: int, caps: PrintCaps) -> _Prints:
    """The print lines of ``data[start:end]``, at most ``caps`` of them kept.

    Kept lines are parsed and checked one by one (each a JSON array of strings);
    the first line past a cap ends the parsing, and the lines from there on are
    counted with one ``bytes.count`` (no copy, no objects). The agent's own
    truncation marker, alone after ``max_calls`` entries, is kept as it is.
    """
    entries: list[list[str]] = []
    text_bytes = 0
    position = start
    while len(entries) < caps.max_calls:
        line_end = data.find(b"\n", position, end)
        line_end = end if line_end < 0 else line_end
        entry = _print_entry(data[position:line_end], len(entries) + 1)
        size = sum(len(arg.encode("utf-8", "surrogatepass")) for arg in entry)
        if text_bytes + size > caps.max_bytes:
            break  # this entry and every one after it are dropped
        text_bytes += size
        entries.append(entry)
        if line_end == end:
            return _Prints(entries, len(entries), 0)
        position = line_end + 1
    remaining = data.count(b"\n", position, end) + 1
    if remaining == 1 and len(entries) == caps.max_calls:
        marker = _truncation_marker(data[position:end])
        if marker is not None:
            return _Prints([*entries, marker], len(entries) + 1, 0)
    dropped = [f"[Output truncated - {remaining} more print statements]"]
    return _Prints([*entries, dropped], len(entries) + remaining, remaining)


def _truncation_marker(line: bytes) -> list[str] | None:
    """The line as the capture's truncation marker entry, or None (parsed only when short)."""
    if len(line) > MARKER_LINE_MAX_BYTES:
        return None
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if (
        isinstance(entry, list)
        and len(entry) == 1
        and isinstance(entry[0], str)
        and _TRUNCATION_MARKER.fullmatch(entry[0])
    ):
        return entry
    return None


def _print_entry(line: bytes, number: int) -> list[str]:
    entry = _json(line, "Agent result is not valid UTF-8 JSON")
    if not isinstance(entry, list) or not all(isinstance(arg, str) for arg in entry):
        raise _wrong_shape(f"print entry {number}: must be a list of strings")
    return entry
