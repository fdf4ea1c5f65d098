"""A task container's output as the host reads it: the attach stream and the caps.

Owns, with no I/O (bytes go in, what they mean comes out, as websockets' reader):

- :class:`StreamDemux`: Docker's multiplexed attach stream (8-byte headers: stream
  number, size) cut back into ``(stream, payload)`` pieces, whatever the socket's
  chunking;
- :class:`Output`: what a task container wrote, within the host's caps: stdout up to
  the task's output cap plus the envelope's overhead, stderr counted against the
  output cap with only its last :data:`STDERR_TAIL_BYTES` kept (crash reports), and
  whether the agent's one length-prefixed frame is complete.

Both backends feed it: Docker from the attach socket, the OCI backend from the
container's stdout and stderr pipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.sandbox.envelope import frame_complete

if TYPE_CHECKING:
    from runner.sandbox.base import ExecutionResult

STDOUT, STDERR = 1, 2
HEADER_BYTES = 8
STDERR_TAIL_BYTES = 64 * 1024
# Room on stdout beyond the task's output cap: the envelope's own fields and framing.
ENVELOPE_OVERHEAD_BYTES = 1024 * 1024


class StreamDemux:
    """Docker's attach stream, demultiplexed; bytes of an unfinished piece are kept."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._ready: list[tuple[int, bytes]] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The whole pieces that ``data`` completes, in order (after any pushed back)."""
        pending = self._pending
        pending += data
        pieces, self._ready = self._ready, []
        while len(pending) >= HEADER_BYTES:
            stream, size = pending[0], int.from_bytes(pending[4:8], "big")
            if len(pending) < HEADER_BYTES + size:
                break
            pieces.append((stream, bytes(pending[HEADER_BYTES : HEADER_BYTES + size])))
            del pending[: HEADER_BYTES + size]
        return pieces

    def push_back(self, pieces: list[tuple[int, bytes]]) -> None:
        """Pieces a reader took but did not use: the next :meth:`feed` returns them first."""
        self._ready = [*pieces, *self._ready]


@dataclass
class Output:
    """What a task container wrote, within the caps the host enforces."""

    stdout_cap: int
    stderr_cap: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr_tail: bytearray = field(default_factory=bytearray)
    stderr_bytes: int = 0
    overflow: bool = False
    timed_out: bool = False
    # A successful result decoded from a complete stdout frame, read before the
    # stream ended: the task is over, no need to wait for the container to exit.
    early_result: ExecutionResult | None = None

    @classmethod
    def for_output_cap(cls, output_bytes: int) -> Output:
        """The caps of a task whose output cap is ``output_bytes``."""
        return cls(stdout_cap=output_bytes + ENVELOPE_OVERHEAD_BYTES, stderr_cap=output_bytes)

    def add(self, stream: int, payload: bytes) -> bool:
        """Take one piece of output; True once a cap is crossed (read no further)."""
        if stream == STDOUT:
            self.stdout += payload
            if len(self.stdout) > self.stdout_cap:
                self.overflow = True
        else:
            self.stderr_bytes += len(payload)
            self.stderr_tail += payload
            del self.stderr_tail[:-STDERR_TAIL_BYTES]
            if self.stderr_bytes > self.stderr_cap:
                self.overflow = True
        return self.overflow

    def has_frame(self) -> bool:
        """Has a whole length-prefixed frame arrived on stdout?"""
        return frame_complete(self.stdout)
