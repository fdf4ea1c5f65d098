"""The agent: the trusted supervisor inside a task container.

Lifecycle (one task per container, then exit):

1. start under tini, import everything it will need, mark itself non-dumpable
   (so the child cannot read its memory or descriptors through ``/proc``), import
   the modules ``--preload=a,b`` names (a warm pool slot: the policy's ``[image]
   preload``, so that the forked child finds them loaded), then block on stdin: a
   pre-started container waits here for its task;
2. read exactly one task envelope, validate it, refuse it if its allowlist does not
   allow every preloaded module (the runner never hands such a task a preloaded
   slot; this is the fail-closed copy of its rule), re-run the static analyzer (the
   runner already did; this copy protects against a runner bug or a changed image);
3. fork the child (the agent is its fork server) into a session of its own and
   supervise it: count every byte it writes to the result pipe against the cap,
   enforce the task timeout, and collect how it ended; then kill every process of
   the task (in the container: ``kill(-1, SIGKILL)``, which reaches every process
   the agent may signal, whatever group or session it moved to) and reap the child
   without ever blocking on it;
4. write one result envelope to stdout and exit 0.

Whose word is a verdict: the child runs the task's code, so its message is the
task's own claim. Every error in the envelope names its ``source``: ``analysis``
(the pre-fork analyzer), ``deadline`` (the timeout this agent enforced),
``output_cap`` (more bytes on the result pipe than the cap, counted here),
``exit`` (how the child ended, from ``waitpid``), ``agent`` (a fault of the agent or
of the task envelope) or ``child`` (whatever the child's message says). The runner
decides what a ``child`` claim may mean; nothing here promotes one.

Standard library only; ``runner`` is never imported here.
"""

from __future__ import annotations

import _ctypes
import contextlib
import errno
import json
import os
import re
import select
import signal
import sys
import time

from .analyzer_core import SECURITY_VIOLATIONS_MESSAGE, ImportPolicy, analyze, import_error
from .child import EXIT_CHILD_FAULT, Child
from .protocol import (
    HEADER,
    VERSION,
    FrameError,
    dumps,
    encode_frame,
    encode_result,
    read_frame,
    write_all,
)

# Names for the type checker only (``typing`` costs the agent's start ~2 ms of CPU;
# these annotations are never evaluated). mypy reads any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

STDIN_FD = 0
STDOUT_FD = 1
PR_SET_DUMPABLE = 4
# The runner's own deadline is later than ours, so a timeout normally gets a clean
# envelope (prints kept) instead of a killed container.
READ_CHUNK = 1 << 16
# After SIGKILL the child is gone within milliseconds (freeing its memory); a child
# that is not (stuck in the kernel) is left to the container's removal rather than
# let the agent block past the runner's deadline.
REAP_TIMEOUT_S = 2.0
# The image's entrypoint passes this: the agent runs under tini in the container's
# own PID namespace, where ``kill(-1)`` reaches only the task's processes. Run any
# other way (a local process in tests) it never sends ``kill(-1)``: there it would
# reach every process of the user.
OWN_PID_NAMESPACE_FLAG = "--own-pid-namespace"
# ``--preload=pandas,numpy``: top-level modules to import before waiting for the task.
PRELOAD_FLAG = "--preload="
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")

# Where a verdict comes from (see the module docstring).
ANALYSIS, DEADLINE, OUTPUT_CAP, EXIT, AGENT, CHILD = (
    "analysis",
    "deadline",
    "output_cap",
    "exit",
    "agent",
    "child",
)
# The print capture's own last entry when it dropped calls (n8n's text).
_TRUNCATION_MARKER = re.compile(r"\[Output truncated - \d+ more print statements\]")


class InvalidTask(Exception):
    """The task envelope is not what the runner promises to send."""


class _CFunction(_ctypes.CFuncPtr):
    """A C function called with C ints, returning a C int (no ``restype``).

    What ``ctypes.CDLL(None).prctl`` is, made from ``_ctypes``, the C module that
    ``ctypes`` is written on: the ``ctypes`` package (with ``ctypes._endian``) cost
    every task container's start ~1.5 ms of CPU for this one call.
    """

    _flags_ = _ctypes.FUNCFLAG_CDECL


def make_undumpable() -> bool:
    """Keep the child (same uid) out of the agent's /proc entries: mem, fds, environ.

    Returns whether it worked; the result is reported in every envelope's stats.
    Seccomp forbids setting it back to 1.
    """
    try:
        # None: the program and the libraries it links (libc), as CDLL(None) opens them;
        # typeshed types dlopen's name as a path only.
        program = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)  # type: ignore[arg-type]
        prctl = _CFunction(_ctypes.dlsym(program, "prctl"))
        return int(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def preload(argv: list[str]) -> tuple[list[str], float] | None:
    """Import the modules ``--preload=`` names; (those imported, milliseconds) or None
    when there is no such argument.

    The modules are the operator's locked packages (``[image] preload``, which only
    names what the lock provides and the allowlist allows), imported by the agent
    before any task exists: no task code runs here. Whatever an import writes goes to
    the container's stderr, never to fd 1 (the result channel). A module that fails
    to import is left out (the task's own import then fails or succeeds as in a cold
    container) and its error is written to stderr.
    """
    asked = [arg.removeprefix(PRELOAD_FLAG) for arg in argv if arg.startswith(PRELOAD_FLAG)]
    if not asked:
        return None
    names = [name for arg in asked for name in arg.split(",") if name]
    started = time.monotonic()
    loaded: list[str] = []
    sys.stdout.flush()
    saved_stdout = os.dup(STDOUT_FD)
    os.dup2(2, STDOUT_FD)
    try:
        for name in names:
            if _MODULE_NAME.fullmatch(name) is None:
                os.write(2, f"preload: not a module name: {name!r}\n".encode())
                continue
            try:
                __import__(name)
            except BaseException as exc:  # the slot must survive any of them
                # KeyboardInterrupt included: OpenBLAS raises SIGINT at numpy's import
                # when it cannot start its threads (the pids limit).
                os.write(2, f"preload: {name}: {type(exc).__name__}: {exc}\n".encode())
                continue
            loaded.append(name)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, STDOUT_FD)
        os.close(saved_stdout)
    # What the imports made is never garbage: out of the collector's sight, the child's
    # collections do not walk pandas' objects (nor touch, so copy, their pages).
    import gc

    gc.freeze()
    return loaded, round((time.monotonic() - started) * 1000, 3)


def preload_refused(task: dict[str, Any], preloaded: list[str]) -> list[str]:
    """The preloaded modules the task's allowlist does not allow."""
    guards_cfg = task["guards"]
    policy = ImportPolicy(
        frozenset(guards_cfg["stdlibAllow"]), frozenset(guards_cfg["externalAllow"])
    )
    return [name for name in preloaded if import_error(name, policy) is not None]


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


def stop_task_processes(child_pid: int, *, own_pid_namespace: bool) -> None:
    """SIGKILL every process of the task; never the agent itself.

    In the container, ``kill(-1, SIGKILL)`` reaches every process the agent may
    signal except itself and the namespace's init (tini): all of the task's
    processes, whatever process group or session they moved to (a task that joins
    the agent's own group makes ``killpg`` of the child's group miss it), and a
    ``docker exec`` of the same uid into the container as well. Outside a PID
    namespace of its own, only the child's session (its process group) is killed.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if own_pid_namespace:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(child_pid, signal.SIGKILL)


class ChildExit:
    """A descriptor that turns readable when the child may have exited, and its reaping.

    The child's pidfd where the kernel has ``pidfd_open``; where it has not (gVisor's
    2022 build answers ENOSYS), a pipe that a SIGCHLD handler writes to
    (``signal.set_wakeup_fd``). The agent has one child, so a wakeup is its exit or a
    stop; :meth:`poll` tells which without blocking.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._wakeup: int | None = None
        try:
            self.fd = os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            self.fd, self._wakeup = os.pipe()
            for fd in (self.fd, self._wakeup):
                os.set_blocking(fd, False)
            # A handler (not SIG_DFL, which ignores SIGCHLD), so the wakeup fd is written.
            signal.signal(signal.SIGCHLD, lambda signum, frame: None)
            signal.set_wakeup_fd(self._wakeup)

    def poll(self) -> int | None:
        """The child's exit code if it has exited (reaped now); None while it runs."""
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                while os.read(self.fd, 512):
                    pass
        try:
            reaped, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status) if reaped else None

    def wait(self, timeout_s: float) -> int | None:
        """:meth:`poll` until the child is gone or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.poll()
            remaining = deadline - time.monotonic()
            if code is not None or remaining <= 0:
                return code
            # poll, not select: gVisor answers select(2) with EPERM under a seccomp
            # profile that allows it (its 2022 build); poll works on both kernels.
            watch = select.poll()
            watch.register(self.fd, select.POLLIN)
            watch.poll(remaining * 1000)

    def close(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self._wakeup)
        os.close(self.fd)


def reap(exit_watch: ChildExit, timeout_s: float) -> int | None:
    """The child's exit code once it is gone, waiting at most ``timeout_s``; else None."""
    return exit_watch.wait(timeout_s)


class Supervision:
    """Outcome of supervising the child: its raw message (if any) and how it ended.

    ``received`` counts every byte the child wrote to the pipe; ``frame`` keeps them
    only until its first message is complete (bytes after it are counted, not kept).
    """

    def __init__(self) -> None:
        self.frame = bytearray()
        self.received = 0
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


def supervise(
    pid: int, read_fd: int, timeout_s: float, max_bytes: int, *, own_pid_namespace: bool = False
) -> Supervision:
    """Read the child's message and reap it, within ``timeout_s``; never blocks longer
    (but for the bounded reap after the kill)."""
    state = Supervision()
    deadline = time.monotonic() + timeout_s
    os.set_blocking(read_fd, False)
    exit_watch = ChildExit(pid)
    # poll(2), as ChildExit.wait: it works on both kernels, and the selectors module
    # would cost every task container's start ~0.5 ms of imports for two descriptors.
    # A hang-up or an error on a descriptor wakes it too; both are read as readable.
    watch = select.poll()
    watch.register(read_fd, select.POLLIN)
    watch.register(exit_watch.fd, select.POLLIN)
    # An exit before the watch existed sent no wakeup: look once now.
    state.exit_code = exit_watch.poll()
    if state.exit_code is not None:
        watch.unregister(exit_watch.fd)
    pipe_open = True
    try:
        while state.exit_code is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state.timed_out = True
                break
            for fd, _ in watch.poll(remaining * 1000):
                if fd == exit_watch.fd:
                    state.exit_code = exit_watch.poll()
                    if state.exit_code is not None:
                        watch.unregister(exit_watch.fd)
                elif pipe_open:
                    pipe_open = _drain(read_fd, state, max_bytes)
                    if not pipe_open:
                        watch.unregister(read_fd)
            if state.overflowed:
                break
        if pipe_open and not state.overflowed:
            # The child is gone; what it wrote is in the pipe buffer. A grandchild
            # may still hold the write end, so never wait for EOF here.
            _drain(read_fd, state, max_bytes)
    finally:
        # Every path ends here, success included: nothing the task started outlives it.
        stop_task_processes(pid, own_pid_namespace=own_pid_namespace)
        if state.exit_code is None:
            state.exit_code = reap(exit_watch, REAP_TIMEOUT_S)
        exit_watch.close()
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
        state.received += len(chunk)
        if not state.has_full_message():
            state.frame += chunk
        if state.received > HEADER.size + max_bytes:
            # Measured here, whoever wrote the bytes: the output cap is exceeded.
            state.overflowed = True
            return True


def _error(
    kind: str, message: str, description: str = "", *, source: str, **extra: Any
) -> dict[str, Any]:
    return {"kind": kind, "message": message, "description": description, "source": source, **extra}


class ChildMessage:
    """The child's message, checked: what it says (``part``) and its print entries.

    ``prints`` holds at most ``maxPrintCalls`` entries (plus the capture's own
    truncation marker); ``dropped`` counts the entries beyond that, which were
    neither checked nor kept.
    """

    def __init__(self, part: dict[str, Any], prints: list[list[str]], dropped: int) -> None:
        self.part = part
        self.prints = prints
        self.dropped = dropped


def interpret(state: Supervision, task: dict[str, Any]) -> dict[str, Any]:
    """Turn what the child did into the result envelope (``prints`` and their count
    included); every error names its source."""
    limits = task["limits"]
    message = _read_child_message(state, limits["maxPrintCalls"])
    prints = message.prints if message is not None else []
    dropped = message.dropped if message is not None else 0
    envelope = _verdict(state, limits, message)
    envelope["prints"], envelope["printsDropped"] = prints, dropped
    return envelope


def _verdict(
    state: Supervision, limits: dict[str, Any], message: ChildMessage | None
) -> dict[str, Any]:
    if state.timed_out:
        error = _error("timeout", timeout_message(limits["timeoutS"]), source=DEADLINE)
        return {"status": "error", "error": error}
    if state.overflowed:
        # The verdict is ours (bytes counted on the pipe); the child's own message, when
        # a complete one came first and says why, lends its words and its prints.
        text = f"Task result exceeds the output limit of {limits['outputBytes']} bytes"
        description = ""
        said = message.part.get("error") if message is not None else None
        if said is not None and said["kind"] == "output_limit_exceeded":
            text, description = said["message"], said["description"]
        return {
            "status": "error",
            "error": _error("output_limit_exceeded", text, description, source=OUTPUT_CAP),
        }
    if state.has_full_message():
        if message is not None:
            return dict(message.part)
        return {
            "status": "error",
            "error": _error(
                "agent_error",
                "Failed to read result from child process",
                "Invalid pipe message content",
                source=AGENT,
            ),
        }
    code = state.exit_code
    if code is not None and code < 0:
        number = -code
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        if number == signal.SIGKILL:
            return {
                "status": "error",
                "error": _error(
                    "killed",
                    "Process was forcefully killed (SIGKILL)",
                    source=EXIT,
                    signal=number,
                ),
            }
        return {
            "status": "error",
            "error": _error(
                "crashed", f"Task process crashed with signal {name}", source=EXIT, signal=number
            ),
        }
    if code:
        return {
            "status": "error",
            "error": _error(
                "crashed", f"Task subprocess exited with code {code}", source=EXIT, exitCode=code
            ),
        }
    return {
        "status": "error",
        "error": _error(
            "agent_error",
            "Process completed but returned no result. This is likely an internal error.",
            source=EXIT,
        ),
    }


def _read_child_message(state: Supervision, max_calls: int) -> ChildMessage | None:
    """The child's first complete message, checked, or None (none, or not valid)."""
    if not state.has_full_message():
        return None
    length = state.message_length() or 0
    body = bytes(state.frame[HEADER.size : HEADER.size + length])
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return _check_child_message(message, max_calls)


def cap_prints(entries: list[Any], max_calls: int) -> tuple[list[list[str]], int] | None:
    """At most ``max_calls`` entries, each checked to be a list of strings, plus the
    capture's own truncation marker; or None when a kept entry is not a list of strings.

    Entries beyond the cap are counted, never looked at: a child that sends 300,000
    of them costs a length. Dropped entries get n8n's marker, with their number.
    """
    kept = entries[:max_calls]
    if not all(
        isinstance(entry, list) and all(isinstance(a, str) for a in entry) for entry in kept
    ):
        return None
    rest = entries[max_calls:]
    if not rest:
        return list(kept), 0
    if len(rest) == 1 and _is_truncation_marker(rest[0]):
        return [*kept, rest[0]], 0
    return [*kept, [f"[Output truncated - {len(rest)} more print statements]"]], len(rest)


def _is_truncation_marker(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 1
        and isinstance(entry[0], str)
        and _TRUNCATION_MARKER.fullmatch(entry[0]) is not None
    )


def _check_child_message(message: Any, max_calls: int) -> ChildMessage | None:
    """Validate the child's message (it comes from untrusted code's process)."""
    if not isinstance(message, dict):
        return None
    raw_prints = message.get("print_args")
    if not isinstance(raw_prints, list):
        return None
    capped = cap_prints(raw_prints, max_calls)
    if capped is None:
        return None
    prints, dropped = capped
    if ("result" in message) == ("error" in message):
        return None
    if "result" in message:
        return ChildMessage({"status": "success", "result": message["result"]}, prints, dropped)
    error = message["error"]
    if not isinstance(error, dict) or not all(
        isinstance(error.get(key), str) for key in ("kind", "message", "description")
    ):
        return None
    part = {
        "status": "error",
        # The child's word, whatever kind it names: the runner decides what it may mean.
        "error": _error(
            error["kind"],
            error["message"],
            error["description"],
            source=CHILD,
            stderr=str(error.get("stderr", "")),
        ),
    }
    return ChildMessage(part, prints, dropped)


def run_task(task: dict[str, Any], *, own_pid_namespace: bool = False) -> dict[str, Any]:
    guards_cfg = task["guards"]
    policy = ImportPolicy(
        frozenset(guards_cfg["stdlibAllow"]), frozenset(guards_cfg["externalAllow"])
    )
    try:
        violations = analyze(task["code"], policy)
    except SyntaxError as exc:
        return {"status": "error", "error": _error("syntax_error", str(exc), source=ANALYSIS)}
    if violations:
        return {
            "status": "error",
            "error": _error(
                "security_violation",
                SECURITY_VIOLATIONS_MESSAGE,
                "\n".join(map(str, violations)),
                source=ANALYSIS,
            ),
        }
    if guards_cfg["blockEnvAccess"]:
        os.environ.clear()
    oom_before, pids_before = oom_kills(), pids_max_events()
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        try:
            os.close(read_fd)
            Child(task, write_fd).run()
        finally:
            # Only reached when the child's code raised before it could send: the
            # copy of the agent in this process must not go on to supervise, answer
            # or unwind through its caller's frames.
            os._exit(EXIT_CHILD_FAULT)
    os.close(write_fd)
    limits = task["limits"]
    state = supervise(
        pid,
        read_fd,
        limits["timeoutS"],
        limits["outputBytes"],
        own_pid_namespace=own_pid_namespace,
    )
    os.close(read_fd)
    run_ms = (time.monotonic() - started) * 1000
    envelope = interpret(state, task)
    oom_after, pids_after = oom_kills(), pids_max_events()
    envelope["stats"] = {
        "childExitCode": state.exit_code,
        "runMs": round(run_ms, 3),
        "oomKilled": _increased(oom_before, oom_after),
        "pidsLimitHit": _increased(pids_before, pids_after),
        "printsDropped": envelope.pop("printsDropped"),
    }
    return envelope


def _increased(before: int | None, after: int | None) -> bool | None:
    if before is None or after is None:
        return None
    return after > before


def main(argv: list[str] | None = None) -> int:
    undumpable = make_undumpable()
    # Both the image's word and the fact: tini (PID 1 of our namespace) is our parent.
    own_pid_namespace = OWN_PID_NAMESPACE_FLAG in (argv or []) and os.getppid() == 1
    preloaded = preload(argv or [])
    try:
        task = _validate(read_frame(STDIN_FD))
    except (FrameError, InvalidTask) as exc:
        envelope: dict[str, Any] = {
            "status": "error",
            "error": _error("invalid_task", str(exc), source=AGENT),
        }
    else:
        refused = preload_refused(task, preloaded[0]) if preloaded else []
        if refused:
            # The child would be a fork of a process that imported what the task may
            # not import: not run at all (the runner's hand-over rule failed).
            text = (
                f"This container preloaded {', '.join(refused)}, which the task's "
                "allowlist does not allow; the task was not run"
            )
            envelope = {"status": "error", "error": _error("agent_error", text, source=AGENT)}
        else:
            envelope = run_task(task, own_pid_namespace=own_pid_namespace)
    prints = envelope.pop("prints", [])
    envelope["version"] = VERSION
    stats = envelope.setdefault("stats", {})
    stats["agentUndumpable"] = undumpable
    if preloaded is not None:
        stats["preloaded"], stats["preloadMs"] = preloaded
    try:
        body = encode_result(envelope, prints)
    except (TypeError, ValueError, RecursionError) as exc:
        body = dumps(
            {
                "version": VERSION,
                "status": "error",
                "error": _error(
                    "agent_error", f"Agent could not encode the result: {exc}", source=AGENT
                ),
            }
        )
    write_all(STDOUT_FD, encode_frame(body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
