"""The agent: the trusted supervisor inside a task container.

Lifecycle (one task per container, then exit):

1. start under tini, import everything it will need, mark itself non-dumpable
   (so the child cannot read its memory or descriptors through ``/proc``), then
   block on stdin: a pre-started container waits here for its task;
2. read exactly one task envelope, validate it, re-run the static analyzer (the
   runner already did; this copy protects against a runner bug or a changed image);
3. fork the child (the agent is its fork server) and supervise it: read its result
   pipe with a byte cap, enforce the task timeout with SIGKILL to the whole process
   group, and collect how it ended;
4. write one result envelope to stdout and exit 0.

Standard library only; ``runner`` is never imported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import sys
import time
from typing import Any

from .analyzer_core import SECURITY_VIOLATIONS_MESSAGE, ImportPolicy, analyze
from .child import Child
from .protocol import (
    HEADER,
    VERSION,
    FrameError,
    dumps,
    encode_frame,
    read_frame,
    write_all,
)

STDIN_FD = 0
STDOUT_FD = 1
PR_SET_DUMPABLE = 4
# The runner's own deadline is later than ours, so a timeout normally gets a clean
# envelope (prints kept) instead of a killed container.
READ_CHUNK = 1 << 16


class InvalidTask(Exception):
    """The task envelope is not what the runner promises to send."""


def make_undumpable() -> bool:
    """Keep the child (same uid) out of the agent's /proc entries: mem, fds, environ.

    Returns whether it worked; the result is reported in every envelope's stats.
    Seccomp forbids setting it back to 1.
    """
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _validate(task: Any) -> dict[str, Any]:
    if not isinstance(task, dict) or task.get("version") != VERSION:
        raise InvalidTask("task envelope must be an object with version 1")
    if not isinstance(task.get("code"), str):
        raise InvalidTask("'code' must be a string")
    if task.get("mode") not in ("all_items", "per_item"):
        raise InvalidTask(f"Unknown nodeMode: {task.get('mode')}")
    if not isinstance(task.get("items"), list):
        raise InvalidTask("'items' must be a list")
    guards_cfg, limits = task.get("guards"), task.get("limits")
    if not isinstance(guards_cfg, dict) or not isinstance(limits, dict):
        raise InvalidTask("'guards' and 'limits' must be objects")
    for key in ("stdlibAllow", "externalAllow", "builtinsDeny"):
        value = guards_cfg.get(key)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise InvalidTask(f"'guards.{key}' must be a list of strings")
    if not isinstance(guards_cfg.get("blockEnvAccess"), bool):
        raise InvalidTask("'guards.blockEnvAccess' must be a boolean")
    for key in ("timeoutS", "outputBytes", "maxPrintCalls"):
        value = limits.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise InvalidTask(f"'limits.{key}' must be a non-negative number")
    return task


def _cgroup_counter(paths: tuple[str, ...], key: str) -> int | None:
    """Read ``key N`` from the first readable cgroup events file (v2 first, then v1)."""
    for path in paths:
        try:
            with open(path, encoding="ascii") as handle:
                for line in handle:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def oom_kills() -> int | None:
    return _cgroup_counter(
        ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"), "oom_kill"
    )


def pids_max_events() -> int | None:
    return _cgroup_counter(("/sys/fs/cgroup/pids.events", "/sys/fs/cgroup/pids/pids.events"), "max")


def timeout_message(timeout_s: float) -> str:
    seconds = int(timeout_s) if float(timeout_s).is_integer() else timeout_s
    unit = "second" if seconds == 1 else "seconds"
    return f"Task execution timed out after {seconds} {unit}"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Supervision:
    """Outcome of supervising the child: its raw message (if any) and how it ended."""

    def __init__(self) -> None:
        self.frame = bytearray()
        self.exit_code: int | None = None
        self.timed_out = False
        self.overflowed = False

    def message_length(self) -> int | None:
        if len(self.frame) < HEADER.size:
            return None
        return int(HEADER.unpack_from(self.frame)[0])

    def has_full_message(self) -> bool:
        length = self.message_length()
        return length is not None and len(self.frame) >= HEADER.size + length


def supervise(pid: int, read_fd: int, timeout_s: float, max_bytes: int) -> Supervision:
    """Read the child's message and reap it, within ``timeout_s``; never blocks longer."""
    state = Supervision()
    deadline = time.monotonic() + timeout_s
    os.set_blocking(read_fd, False)
    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    selector.register(read_fd, selectors.EVENT_READ, "pipe")
    selector.register(pidfd, selectors.EVENT_READ, "exit")
    pipe_open = True
    try:
        while state.exit_code is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state.timed_out = True
                break
            for key, _ in selector.select(remaining):
                if key.data == "exit":
                    _, status = os.waitpid(pid, 0)
                    state.exit_code = os.waitstatus_to_exitcode(status)
                    selector.unregister(pidfd)
                elif pipe_open:
                    pipe_open = _drain(read_fd, state, max_bytes)
                    if not pipe_open:
                        selector.unregister(read_fd)
            if state.overflowed:
                break
        if pipe_open and not state.overflowed:
            # The child is gone; what it wrote is in the pipe buffer. A grandchild
            # may still hold the write end, so never wait for EOF here.
            _drain(read_fd, state, max_bytes)
    finally:
        selector.close()
        os.close(pidfd)
        _kill_group(pid)
        if state.exit_code is None:
            _, status = os.waitpid(pid, 0)
            state.exit_code = os.waitstatus_to_exitcode(status)
    return state


def _drain(read_fd: int, state: Supervision, max_bytes: int) -> bool:
    """Read what is available; return False at EOF."""
    while True:
        try:
            chunk = os.read(read_fd, READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        state.frame += chunk
        if len(state.frame) > HEADER.size + max_bytes:
            state.overflowed = True
            return True


def _error(kind: str, message: str, description: str = "", **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "message": message, "description": description, **extra}


def interpret(state: Supervision, task: dict[str, Any]) -> dict[str, Any]:
    """Turn what the child did into the result envelope's ``status``/``result``/``error``."""
    limits = task["limits"]
    if state.timed_out:
        return {"status": "error", "error": _error("timeout", timeout_message(limits["timeoutS"]))}
    if state.overflowed:
        return {
            "status": "error",
            "error": _error(
                "output_limit_exceeded",
                f"Task result exceeds the output limit of {limits['outputBytes']} bytes",
            ),
        }
    if state.has_full_message():
        length = state.message_length() or 0
        body = bytes(state.frame[HEADER.size : HEADER.size + length])
        try:
            message = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            message = None
        checked = _check_child_message(message)
        if checked is not None:
            return checked
        return {
            "status": "error",
            "error": _error(
                "agent_error",
                "Failed to read result from child process",
                "Invalid pipe message content",
            ),
        }
    code = state.exit_code
    if code is not None and code < 0:
        number = -code
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        if number == signal.SIGKILL:
            return {
                "status": "error",
                "error": _error("killed", "Process was forcefully killed (SIGKILL)", signal=number),
            }
        return {
            "status": "error",
            "error": _error("crashed", f"Task process crashed with signal {name}", signal=number),
        }
    if code:
        return {
            "status": "error",
            "error": _error("crashed", f"Task subprocess exited with code {code}", exitCode=code),
        }
    return {
        "status": "error",
        "error": _error(
            "agent_error",
            "Process completed but returned no result. This is likely an internal error.",
        ),
    }


def _check_child_message(message: Any) -> dict[str, Any] | None:
    """Validate the child's message (it comes from untrusted code's process)."""
    if not isinstance(message, dict):
        return None
    prints = message.get("print_args")
    if not isinstance(prints, list) or not all(
        isinstance(entry, list) and all(isinstance(arg, str) for arg in entry) for entry in prints
    ):
        return None
    if ("result" in message) == ("error" in message):
        return None
    if "result" in message:
        return {"status": "success", "result": message["result"], "prints": prints}
    error = message["error"]
    if not isinstance(error, dict) or not all(
        isinstance(error.get(key), str) for key in ("kind", "message", "description")
    ):
        return None
    return {
        "status": "error",
        "error": {
            "kind": error["kind"],
            "message": error["message"],
            "description": error["description"],
            "stderr": str(error.get("stderr", "")),
        },
        "prints": prints,
    }


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    guards_cfg = task["guards"]
    policy = ImportPolicy(
        frozenset(guards_cfg["stdlibAllow"]), frozenset(guards_cfg["externalAllow"])
    )
    try:
        violations = analyze(task["code"], policy)
    except SyntaxError as exc:
        return {"status": "error", "error": _error("syntax_error", str(exc))}
    if violations:
        return {
            "status": "error",
            "error": _error(
                "security_violation", SECURITY_VIOLATIONS_MESSAGE, "\n".join(map(str, violations))
            ),
        }
    if guards_cfg["blockEnvAccess"]:
        os.environ.clear()
    oom_before, pids_before = oom_kills(), pids_max_events()
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        os.close(read_fd)
        Child(task, write_fd).run()
    os.close(write_fd)
    state = supervise(pid, read_fd, task["limits"]["timeoutS"], task["limits"]["outputBytes"])
    os.close(read_fd)
    run_ms = (time.monotonic() - started) * 1000
    envelope = interpret(state, task)
    envelope.setdefault("prints", [])
    oom_after, pids_after = oom_kills(), pids_max_events()
    envelope["stats"] = {
        "childExitCode": state.exit_code,
        "runMs": round(run_ms, 3),
        "oomKilled": _increased(oom_before, oom_after),
        "pidsLimitHit": _increased(pids_before, pids_after),
    }
    return envelope


def _increased(before: int | None, after: int | None) -> bool | None:
    if before is None or after is None:
        return None
    return after > before


def main() -> int:
    undumpable = make_undumpable()
    try:
        task = _validate(read_frame(STDIN_FD))
    except (FrameError, InvalidTask) as exc:
        envelope: dict[str, Any] = {
            "status": "error",
            "error": _error("invalid_task", str(exc)),
            "prints": [],
        }
    else:
        envelope = run_task(task)
    envelope["version"] = VERSION
    envelope.setdefault("stats", {})["agentUndumpable"] = undumpable
    try:
        body = dumps(envelope)
    except (TypeError, ValueError, RecursionError) as exc:
        body = dumps(
            {
                "version": VERSION,
                "status": "error",
                "prints": [],
                "error": _error("agent_error", f"Agent could not encode the result: {exc}"),
            }
        )
    write_all(STDOUT_FD, encode_frame(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
