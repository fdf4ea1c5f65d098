"""The runner's side of the agent protocol: task envelope out, result envelope in.

Framing: a 4-byte unsigned big-endian length, then UTF-8 JSON (see
``sandbox_image/agent/sandbox_agent/protocol.py`` for the agent's side).

The agent runs next to hostile code, so its output is **untrusted input**: the
result envelope is parsed with a strict pydantic model, exactly one frame must be
present, and every way it can be wrong becomes an :class:`AgentProtocolError` with
a reason (wrong length prefix, truncated frame, invalid JSON, several frames,
wrong shape). Nothing here trusts a length it has not checked against the cap.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import AgentProtocolError
from runner.sandbox.base import Limits, TaskSpec

HEADER = struct.Struct(">I")
PROTOCOL_VERSION = 1


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


class AgentError(_Strict):
    kind: str = Field(max_length=64)
    message: str
    description: str = ""
    stderr: str = ""
    signal: int | None = None
    exit_code: int | None = Field(None, alias="exitCode")


class AgentStats(_Strict):
    child_exit_code: int | None = Field(None, alias="childExitCode")
    run_ms: float | None = Field(None, alias="runMs")
    oom_killed: bool | None = Field(None, alias="oomKilled")
    pids_limit_hit: bool | None = Field(None, alias="pidsLimitHit")
    agent_undumpable: bool | None = Field(None, alias="agentUndumpable")


class ResultEnvelope(_Strict):
    version: Literal[1]
    status: Literal["success", "error"]
    result: Any = None
    error: AgentError | None = None
    prints: list[list[str]] = Field(default_factory=list)
    stats: AgentStats = Field(default_factory=AgentStats)


def frame_complete(data: bytes | bytearray) -> bool:
    """Has a whole length-prefixed frame arrived at the start of ``data``?"""
    if len(data) < HEADER.size:
        return False
    length: int = HEADER.unpack_from(data)[0]
    return len(data) >= HEADER.size + length


def decode_result(stdout: bytes) -> ResultEnvelope:
    """Parse the agent's stdout: exactly one frame holding one valid result envelope."""
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
    try:
        document = json.loads(stdout[HEADER.size : end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the decoder's stack, from a hostile agent.
        raise AgentProtocolError("Agent result is not valid UTF-8 JSON", hint=str(exc)) from exc
    try:
        envelope = ResultEnvelope.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise AgentProtocolError(
            "Agent result envelope has the wrong shape", hint=f"{where}: {first['msg']}"
        ) from exc
    if (envelope.status == "error") != (envelope.error is not None):
        raise AgentProtocolError(
            "Agent result envelope has the wrong shape",
            hint="'error' must be present exactly when status is 'error'",
        )
    return envelope
