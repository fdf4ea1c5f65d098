"""The attach-stream reader of DockerSandbox, without Docker: frames over a socketpair.

A complete stdout frame ends the read early (the result is in; the daemon's view of
the exit is not waited for); bytes after it stay in ``pending`` for a read to EOF.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from runner.sandbox.docker import DockerSandbox, _Output

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


def pump(sock: socket.socket, output: _Output, *, until_frame: bool) -> bool:
    deadline = time.monotonic() + 5
    return DockerSandbox._pump(sock, output, deadline, 1 << 20, 1 << 20, until_frame=until_frame)


def test_a_complete_stdout_frame_ends_the_read_before_the_stream_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    frame = result_frame(b'{"status":"success"}')
    # Split across docker frames and socket writes; stderr interleaved; stream left open.
    theirs.sendall(docker_frame(STDERR, b"warning\n") + docker_frame(STDOUT, frame[:5]))
    theirs.sendall(docker_frame(STDOUT, frame[5:]) + docker_frame(STDERR, b"late"))
    output = _Output()
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
    output = _Output()
    assert pump(ours, output, until_frame=True) is True
    assert not output.has_frame()
    assert not output.timed_out


def test_the_stdout_cap_still_holds_when_reading_until_a_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(docker_frame(STDOUT, struct.pack(">I", 1 << 30) + b"x" * 4096))
    output = _Output()
    deadline = time.monotonic() + 5
    assert DockerSandbox._pump(ours, output, deadline, 1024, 1 << 20, until_frame=True) is True
    assert output.overflow
