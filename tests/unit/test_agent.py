"""The agent's supervision, in this process: what it says is its own and what is the
child's, the print cap on the child's message, and a reap that never blocks.

``kill(-1)`` (the in-container way to end every task process) is never sent here:
outside a PID namespace of its own it would reach every process of this user. The
tests that need it run in a real task container (tests/integration/test_limits.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def agent(agent_pkg: ModuleType) -> Any:
    import sandbox_agent.agent as module  # staged by the agent_pkg fixture

    return module


def supervision(agent: Any, message: dict[str, Any] | None = None, **flags: Any) -> Any:
    state = agent.Supervision()
    if message is not None:
        body = json.dumps(message).encode()
        state.frame += agent.HEADER.pack(len(body)) + body
        state.received = len(state.frame)
    for name, value in flags.items():
        setattr(state, name, value)
    return state


TASK = {"limits": {"timeoutS": 2, "outputBytes": 1024, "maxPrintCalls": 3}}


# -- the print cap on the child's message ---------------------------------------------


def test_the_childs_prints_are_capped_and_the_rest_counted_unseen(agent: Any) -> None:
    # Entries past the cap are counted, never looked at (this one is not even a list).
    entries = [["a"], ["b"], ["c"], "not an entry", ["e"]]
    assert agent.cap_prints(entries, 3) == (
        [["a"], ["b"], ["c"], ["[Output truncated - 2 more print statements]"]],
        2,
    )


def test_the_captures_own_marker_is_kept(agent: Any) -> None:
    marker = ["[Output truncated - 9 more print statements]"]
    assert agent.cap_prints([["a"]] * 3 + [marker], 3) == ([["a"]] * 3 + [marker], 0)


def test_a_kept_entry_that_is_not_strings_spoils_the_message(agent: Any) -> None:
    assert agent.cap_prints([["a"], [1]], 3) is None


def test_a_flood_from_the_child_is_capped_by_the_agent(agent: Any) -> None:
    message = {"result": 1, "print_args": [[]] * 300_000}
    envelope = agent.interpret(supervision(agent, message, exit_code=0), TASK)
    assert envelope["status"] == "success"
    assert len(envelope["prints"]) == 4
    assert envelope["printsDropped"] == 300_000 - 3


# -- whose word -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["timeout", "security_violation", "output_limit_exceeded", "killed", "user_error"]
)
def test_every_error_in_the_childs_message_is_marked_as_the_childs(agent: Any, kind: str) -> None:
    message = {"error": {"kind": kind, "message": "m", "description": "d"}, "print_args": []}
    envelope = agent.interpret(supervision(agent, message, exit_code=0), TASK)
    assert envelope["error"]["kind"] == kind
    assert envelope["error"]["source"] == "child"


def test_the_deadline_is_the_agents_own(agent: Any) -> None:
    forged = {"error": {"kind": "user_error", "message": "m", "description": ""}, "print_args": []}
    envelope = agent.interpret(supervision(agent, forged, timed_out=True), TASK)
    assert envelope["error"]["kind"] == "timeout"
    assert envelope["error"]["source"] == "deadline"
    assert envelope["error"]["message"] == "Task execution timed out after 2 seconds"


def test_an_overflow_is_measured_and_borrows_the_childs_words(agent: Any) -> None:
    said = {
        "error": {
            "kind": "output_limit_exceeded",
            "message": "Task printed more than the output limit of 1024 bytes",
            "description": "2000 bytes printed",
        },
        "print_args": [["'x'"]],
    }
    envelope = agent.interpret(supervision(agent, said, overflowed=True), TASK)
    assert envelope["error"]["source"] == "output_cap"
    assert envelope["error"]["message"] == said["error"]["message"]
    assert envelope["prints"] == [["'x'"]]
    unexplained = agent.interpret(supervision(agent, None, overflowed=True), TASK)
    assert unexplained["error"]["source"] == "output_cap"
    assert unexplained["error"]["message"] == ("Task result exceeds the output limit of 1024 bytes")


def test_an_exit_without_a_message_is_the_agents_observation(agent: Any) -> None:
    envelope = agent.interpret(supervision(agent, None, exit_code=-signal.SIGKILL), TASK)
    assert envelope["error"]["kind"] == "killed"
    assert envelope["error"]["source"] == "exit"


def test_the_result_body_is_the_envelope_then_one_line_per_print(agent: Any) -> None:
    body = agent.encode_result({"version": 2, "status": "success"}, [["'a\nb'"], []])
    lines = body.split(b"\n")
    assert [json.loads(line) for line in lines] == [
        {"version": 2, "status": "success"},
        ["'a\nb'"],
        [],
    ]


# -- supervision never blocks on a child it cannot kill ---------------------------------


def test_supervision_returns_when_the_child_escaped_the_kill(agent: Any) -> None:
    # Issue item 5: a task that joins another process group (here: this test
    # process's) makes ``killpg`` of the child's group miss it. Outside a container
    # the agent has no ``kill(-1)``, so the child survives; the agent must still
    # return (it used to block in ``waitpid`` forever).
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: leave its group, then spin; never back into pytest
        try:
            os.close(read_fd)
            os.setpgid(0, os.getpgid(os.getppid()))
            while True:
                time.sleep(0.05)
        finally:
            os._exit(1)
    os.close(write_fd)
    try:
        state = agent.supervise(pid, read_fd, 0.2, 1024, own_pid_namespace=False)
        assert state.timed_out
        assert state.exit_code is None  # not reaped: it was not killed
        os.kill(pid, 0)  # and it is still alive: the agent returned without it
    finally:
        os.close(read_fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_supervision_kills_and_reaps_a_child_on_time(agent: Any) -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setsid()  # as the task child does
            while True:
                time.sleep(0.05)
        finally:
            os._exit(1)
    os.close(write_fd)
    try:
        state = agent.supervise(pid, read_fd, 0.2, 1024, own_pid_namespace=False)
    finally:
        os.close(read_fd)
    assert state.timed_out
    assert state.exit_code == -signal.SIGKILL


@pytest.mark.parametrize("pidfd", ["pidfd", "no pidfd (gVisor)"])
def test_supervision_sees_the_exit_with_or_without_pidfd_open(
    agent: Any, pidfd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gVisor's 2022 build has no pidfd_open (ENOSYS): the agent then learns of the
    child's exit from SIGCHLD, through a wakeup pipe; either way the child's message and
    its exit code are read, well before the timeout, and SIGCHLD is left as it was."""
    if pidfd != "pidfd":

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            time.sleep(0.2)  # exits after the watch is set up: the wakeup must come
            body = json.dumps({"result": 1, "print_args": []}).encode()
            os.write(write_fd, agent.HEADER.pack(len(body)) + body)
        finally:
            os._exit(3)
    os.close(write_fd)
    try:
        state = agent.supervise(pid, read_fd, 30, 1024, own_pid_namespace=False)
    finally:
        os.close(read_fd)
    assert not state.timed_out
    assert state.exit_code == 3
    assert state.has_full_message()
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
