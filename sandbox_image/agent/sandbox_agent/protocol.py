"""Framing and envelope shapes between the runner, the agent and the task child.

Every message is one frame: a 4-byte unsigned big-endian length, then that many
bytes of UTF-8 JSON (the same framing n8n's runner uses on its child pipe).

- runner -> agent, on the container's stdin: one *task envelope*;
- child -> agent, on a private pipe: one *child message*
  (``{"result": ..., "print_args": [...]}`` or ``{"error": {...}, "print_args": [...]}``);
- agent -> runner, on the container's stdout: one *result envelope*. Its body is
  lines (``\n``-separated): the first is the envelope's JSON object, every further
  line is one print entry (a JSON array of strings). JSON text never holds a raw
  newline, so the runner can find, count and cap the print entries by their line
  breaks without parsing the ones it drops (a hostile envelope of 300,000 empty
  entries costs it a byte count, not 300,000 objects).

Standard library only: this runs inside the task image and never imports ``runner``.
"""

from __future__ import annotations

import json
import math
import os
import struct

# Names for the type checker only (``typing`` costs the agent's start ~2 ms of CPU;
# these annotations are never evaluated). mypy reads any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# 2: print entries are lines after the envelope, verdicts name their source.
VERSION = 2
HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 0xFFFFFFFF


class FrameError(Exception):
    """A frame could not be read: truncated, oversized or not JSON."""


def read_exact(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise FrameError(f"input ended after {count - remaining} of {count} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    (length,) = HEADER.unpack(read_exact(fd, HEADER.size))
    if length == 0 or length > max_bytes:
        raise FrameError(f"Invalid frame length: {length} bytes")
    body = read_exact(fd, length)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {exc}") from None


def encode_frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds the frame limit")
    return HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def finite(value: Any, _depth: int = 0) -> Any:
    """Replace NaN and +/-Infinity by ``None`` (what JavaScript's JSON.stringify does).

    Python's json emits them as bare ``NaN``/``Infinity`` tokens, which Node's
    JSON.parse rejects: the broker would drop the message and the task would hang.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item, _depth + 1) for item in value]
    return value


def dumps(value: Any) -> bytes:
    """n8n's result encoding (non-JSON types become ``str(value)``), without bare NaN.

    A lone surrogate (``"\\ud800"``) cannot be UTF-8 encoded; such a document is
    sent with ASCII escapes instead, which JSON parsers on both sides accept.
    """
    text = json.dumps(
        finite(value), default=str, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(
            finite(value), default=str, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def encode_result(envelope: dict[str, Any], prints: list[list[str]]) -> bytes:
    """The result envelope's body: the envelope's JSON, then one line per print entry."""
    lines = [dumps(envelope)]
    lines.extend(dumps(entry) for entry in prints)
    return b"\n".join(lines)
