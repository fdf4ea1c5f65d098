"""The attach-stream reader of DockerSandbox, without Docker: frames over a socketpair,
and the pure demultiplexer under it (runner/sandbox/stream.py).

A complete stdout frame ends the read early (the result is in; the daemon's view of
the exit is not waited for); what came after it stays in the demultiplexer for a
read to EOF.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runner.sandbox.docker import pump as docker_pump
from runner.sandbox.stream import Output, StreamDemux

STDOUT, STDERR = 1, 2


def docker_frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def result_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


class ReadOutput(Output):
    """An output with the demultiplexer of its exchange (the sandbox keeps one each)."""

    def __init__(self) -> None:
        super().__init__(stdout_cap=1 << 20, stderr_cap=1 << 20)
        self.demux = StreamDemux()


def new_output() -> ReadOutput:
    return ReadOutput()


def pump(sock: socket.socket, output: ReadOutput, *, until_frame: bool) -> bool:
    deadline = time.monotonic() + 5
    return docker_pump(sock, output.demux, output, deadline, until_frame=until_frame)


def test_a_complete_stdout_frame_ends_the_read_before_the_stream_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    frame = result_frame(b'{"status":"success"}')
    # Split across docker frames and socket writes; stderr interleaved; stream left open.
    theirs.sendall(docker_frame(STDERR, b"warning\n") + docker_frame(STDOUT, frame[:5]))
    theirs.sendall(docker_frame(STDOUT, frame[5:]) + docker_frame(STDERR, b"late"))
    output = new_output()
    assert pump(ours, output, until_frame=True) is False
    assert bytes(output.stdout) == frame
    assert output.has_frame()
    assert bytes(output.stderr_tail) == b"warning\n"
    # What arrived after the frame is kept and read on to EOF when asked to.
    theirs.shutdown(socket.SHUT_WR)
    assert pump(ours, output, until_frame=False) is True
    assert bytes(output.stderr_tail) == b"warning\nlate"
    assert output.stderr_bytes == len(b"warning\nlate")


def test_without_a_complete_frame_the_read_goes_on_to_eof(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(docker_frame(STDOUT, struct.pack(">I", 100) + b"truncated"))
    theirs.shutdown(socket.SHUT_WR)
    output = new_output()
    assert pump(ours, output, until_frame=True) is True
    assert not output.has_frame()
    assert not output.timed_out


def test_the_stdout_cap_still_holds_when_reading_until_a_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(docker_frame(STDOUT, struct.pack(">I", 1 << 30) + b"x" * 4096))
    output = new_output()
    deadline = time.monotonic() + 5
    output.stdout_cap = 1024
    assert docker_pump(ours, StreamDemux(), output, deadline, until_frame=True) is True
    assert output.overflow


def test_the_demultiplexer_cuts_pieces_whatever_the_chunking() -> None:
    stream = docker_frame(STDOUT, b"abc") + docker_frame(STDERR, b"") + docker_frame(STDERR, b"e")
    for size in (1, 2, 7, 8, 9, len(stream)):
        demux, pieces = StreamDemux(), []
        for start in range(0, len(stream), size):
            pieces += demux.feed(stream[start : start + size])
        assert pieces == [(STDOUT, b"abc"), (STDERR, b""), (STDERR, b"e")], size


def test_pieces_pushed_back_come_first() -> None:
    demux = StreamDemux()
    first = demux.feed(docker_frame(STDOUT, b"a") + docker_frame(STDERR, b"b"))
    demux.push_back(first[1:])
    assert demux.feed(docker_frame(STDOUT, b"c")) == [(STDERR, b"b"), (STDOUT, b"c")]


# -- the daemon's OOM record (it can lag the container's exit) ---------------------------


class _LaggingDaemon:
    """The daemon's record of an ended container: OOMKilled turns true only at the
    ``lag``-th inspect, as when containerd's OOM event reaches dockerd after the exit."""

    def __init__(self, lag: int) -> None:
        self.lag, self.inspects = lag, 0

    def _exit_state(self, container_id: str) -> Any:
        from runner.sandbox.docker import _ExitState

        self.inspects += 1
        return _ExitState(oom_killed=self.inspects >= self.lag)

    def _outside_kill(self, container_id: str, state: Any) -> bool | None:
        return None


@pytest.mark.parametrize("reported", [True, False], ids=["agent-read-an-oom", "no-report"])
def test_the_daemons_oom_record_is_waited_for_only_when_the_agent_read_an_oom(
    reported: bool,
) -> None:
    from runner.sandbox.docker import DockerContainer, DockerSandbox

    daemon = _LaggingDaemon(lag=4)
    container = DockerContainer("c" * 64, 0.0, 1, {})
    facts = DockerSandbox._exit_facts(
        daemon,  # type: ignore[arg-type]
        container,
        attribute_kill=False,
        oom_possible=reported,
    )
    # With the agent's reading, the daemon is asked again until its record arrives
    # (the verdict is still the daemon's); without it, its first answer stands.
    assert facts.oom_killed is reported
    assert daemon.inspects == (4 if reported else 1)


def test_the_agents_oom_reading_alone_never_makes_a_memory_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner.sandbox.docker import DockerContainer, DockerSandbox

    monkeypatch.setattr("runner.sandbox.docker.OOM_RECORD_WAIT_S", 0.2)  # then gives up

    daemon = _LaggingDaemon(lag=10**9)  # the daemon never records an OOM kill
    facts = DockerSandbox._exit_facts(
        daemon,  # type: ignore[arg-type]
        DockerContainer("c" * 64, 0.0, 1, {}),
        attribute_kill=False,
        oom_possible=True,
    )
    assert facts.oom_killed is False
