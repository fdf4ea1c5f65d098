"""Frames <-> messages. Every malformed frame becomes one :class:`~runner.errors.ProtocolError`.

Frames are JSON text (binary frames are decoded as UTF-8, as n8n's runner does).
Encoding never emits bare ``NaN``/``Infinity`` (Node's JSON.parse rejects them and
the broker would drop the message): such a value is a bug upstream and raises.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from runner.errors import ProtocolError, UnknownMessageType
from runner.protocol.messages import (
    BROKER_MESSAGE_TYPES,
    RUNNER_MESSAGE_TYPES,
    BrokerMessage,
    RunnerMessage,
)

_BROKER = TypeAdapter[Any](BrokerMessage)
_RUNNER = TypeAdapter[Any](RunnerMessage)


def _load(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"Frame is not UTF-8: {exc}") from None
    try:
        document = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the decoder's stack (``[[[[...``), a
        # malformed frame like any other, not a crash of the connection.
        raise ProtocolError(f"Frame is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"Frame is not a JSON object but {type(document).__name__}")
    if not isinstance(document.get("type"), str):
        raise ProtocolError("Frame has no 'type'")
    return document


def _validate(adapter: TypeAdapter[Any], document: dict[str, Any], known: frozenset[str]) -> Any:
    if document["type"] not in known:
        raise UnknownMessageType(f"Unknown message type: {document['type']}")
    try:
        return adapter.validate_python(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "message"
        raise ProtocolError(
            f"Invalid {document['type']} message: {where}: {first['msg']}"
        ) from None


def decode_broker_message(frame: str | bytes) -> Any:
    """A broker -> runner frame as a message model (runner side)."""
    return _validate(_BROKER, _load(frame), BROKER_MESSAGE_TYPES)


def decode_runner_message(frame: str | bytes) -> Any:
    """A runner -> broker frame as a message model (broker side)."""
    return _validate(_RUNNER, _load(frame), RUNNER_MESSAGE_TYPES)


def encode(message: BaseModel) -> str:
    """A message as a JSON text frame (camelCase keys, no bare NaN)."""
    try:
        document = message.model_dump(mode="json", by_alias=True)
    except UnicodeEncodeError:
        # pydantic's JSON mode refuses lone surrogates; our messages hold only JSON
        # types, so the Python mode gives the same document, surrogates and all.
        document = message.model_dump(mode="python", by_alias=True)
    frame = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        frame.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON text as an escape, from a task's code, items
        # or result) cannot go into a UTF-8 text frame: the send would fail and take
        # the connection's writer down. As an ASCII escape it travels unchanged.
        frame = json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return frame
