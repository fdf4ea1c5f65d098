"""The forkserver of way (a): one long-lived host process that forks a child per task.

**No isolation**: a benchmark baseline, never a way to run untrusted code.

:class:`bench.forkserver.sandbox.ForkserverSandbox` copies this file beside a staged
agent bundle and starts it once per benchmark run as ``python -I -B forkserver.py``.
It imports, once, everything a task needs -- the agent's modules (the child, the
guards, the analyzer core, the framing), json -- so that a task costs a fork, not an
interpreter start. That is how n8n's own Python runner works (a forkserver with the
interpreter and its modules loaded, a forked child per task, the result back over a
pipe as length-prefixed JSON), and the strongest real alternative to a container per
task.

For each task it does what the in-container agent (:mod:`sandbox_agent.agent`) does,
minus the container, with the agent's own functions wherever they exist: validate the
envelope, re-run the analyzer, fork a child that runs :class:`sandbox_agent.child.Child`
(the very code path of the agent's child, so the benchmark compares isolation, not
code), supervise it (every byte on its result pipe counted against the cap, the
deadline, its exit through a pidfd), kill its session, and answer with the agent's
result envelope. Where the agent serves one task and exits, this serves any number at
once from one selector loop, single-threaded (a process that forks must not have
threads). Not done, because there is no container: the cgroup readings (OOM kills,
the pids limit; reported as unknown) and ``kill(-1)`` (the child's session is killed,
as the agent does outside a PID namespace of its own).

Wire, over the process's stdin and stdout: a request is a 4-byte big-endian task
number and then the agent's framed task envelope; an answer is the task number and
then the agent's framed result envelope. Number 0 with an empty frame says "ready".
A task number with the :data:`CANCEL` bit set, and an empty frame, asks to stop that
task now (as the agent stops one: its child's session killed); its answer comes as
for any task that ended.
Standard library and ``sandbox_agent`` only: this never imports ``runner`` or
``bench``.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import struct
import sys
import time
from typing import Any

# Isolated mode (-I) leaves the script's own folder off the path: the staged agent
# bundle is beside this file, as it is beside the agent's run.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sandbox_agent import agent
from sandbox_agent.analyzer_core import SECURITY_VIOLATIONS_MESSAGE, ImportPolicy, analyze
from sandbox_agent.child import Child
from sandbox_agent.protocol import HEADER, VERSION, dumps, encode_frame, encode_result, write_all

NUMBER = struct.Struct(">I")
CANCEL = 1 << 31  # in a request's number: stop that task (bench/forkserver/sandbox.py too)
STDIN_FD, STDOUT_FD = 0, 1
READ_CHUNK = 1 << 16
# The child never returns from Child.run(); if setting it up raises, it must not fall
# back into this loop as a second server.
EXIT_CHILD_SETUP_FAILED = 70


class Task:
    """One task in flight: its child, its pipe, how its supervision stands."""

    def __init__(self, number: int, task: dict[str, Any], pid: int, read_fd: int) -> None:
        self.number = number
        self.task = task
        self.pid = pid
        self.read_fd = read_fd
        self.watch = agent.ChildExit(pid)
        self.state = agent.Supervision()
        self.started = time.monotonic()
        self.deadline = self.started + task["limits"]["timeoutS"]
        self.pipe_open = True
        self.stopped = False  # the child's session was killed; waiting for its reaping
        self.done = False


class Server:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.inbox = bytearray()
        self.tasks: dict[int, Task] = {}
        self.reading = True
        self.undumpable = agent.make_undumpable()

    # -- the loop -------------------------------------------------------------------

    def serve(self) -> None:
        os.set_blocking(STDIN_FD, False)
        self.selector.register(STDIN_FD, selectors.EVENT_READ, None)
        write_all(STDOUT_FD, NUMBER.pack(0) + HEADER.pack(0))
        while self.reading or self.tasks:
            timeout = None
            if self.tasks:
                timeout = max(0.0, min(t.deadline for t in self.tasks.values()) - time.monotonic())
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self._read_requests()
                    continue
                task, what = key.data
                if not task.done:  # an event of a task finished earlier in this batch
                    self._on_event(task, what)
            now = time.monotonic()
            for task in [t for t in self.tasks.values() if t.deadline <= now]:
                if task.stopped:
                    self._complete(task)  # not reaped within REAP_TIMEOUT_S: say so
                else:
                    task.state.timed_out = True
                    self._stop(task)

    def _read_requests(self) -> None:
        try:
            chunk = os.read(STDIN_FD, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            # The benchmark is done and waits for no answer: nothing of a task outlives
            # the server (the killed children are reaped by whoever inherits them).
            self.reading = False
            for task in self.tasks.values():
                agent.stop_task_processes(task.pid, own_pid_namespace=False)
            self.tasks.clear()
            return
        self.inbox += chunk
        head = NUMBER.size + HEADER.size
        while len(self.inbox) >= head:
            number = NUMBER.unpack_from(self.inbox)[0]
            length = HEADER.unpack_from(self.inbox, NUMBER.size)[0]
            if len(self.inbox) < head + length:
                break
            body = bytes(self.inbox[head : head + length])
            del self.inbox[: head + length]
            if number & CANCEL:
                self._cancel(number & ~CANCEL)
            else:
                self._start(number, body)

    # -- one task: what agent.run_task does, without blocking the others ---------------

    def _start(self, number: int, body: bytes) -> None:
        try:
            # What protocol.read_frame and agent.main do with the agent's stdin.
            task = agent._validate(json.loads(body.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, agent.InvalidTask) as exc:
            error = agent._error("invalid_task", str(exc), source=agent.AGENT)
            self._answer(number, {"status": "error", "error": error})
            return
        refusal = self._analyze(task)
        if refusal is not None:
            self._answer(number, refusal)
            return
        if task["guards"]["blockEnvAccess"]:
            os.environ.clear()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                Child(task, write_fd).run()  # the agent's child: never returns
            finally:
                os._exit(EXIT_CHILD_SETUP_FAILED)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        running = Task(number, task, pid, read_fd)
        self.tasks[number] = running
        self.selector.register(read_fd, selectors.EVENT_READ, (running, "pipe"))
        # An exit before the watch existed sent no wakeup: look once now.
        running.state.exit_code = running.watch.poll()
        if running.state.exit_code is not None:
            self._stop(running)
        else:
            self.selector.register(running.watch.fd, selectors.EVENT_READ, (running, "exit"))

    def _cancel(self, number: int) -> None:
        """Stop a running task now; one that has ended (or is being reaped) is left be."""
        task = self.tasks.get(number)
        if task is not None and not task.stopped:
            self._stop(task)

    def _analyze(self, task: dict[str, Any]) -> dict[str, Any] | None:
        """The agent's pre-fork check (agent.run_task): the envelope of a refusal, or None."""
        guards_cfg = task["guards"]
        policy = ImportPolicy(
            frozenset(guards_cfg["stdlibAllow"]), frozenset(guards_cfg["externalAllow"])
        )
        try:
            violations = analyze(task["code"], policy)
        except SyntaxError as exc:
            error = agent._error("syntax_error", str(exc), source=agent.ANALYSIS)
            return {"status": "error", "error": error}
        if not violations:
            return None
        error = agent._error(
            "security_violation",
            SECURITY_VIOLATIONS_MESSAGE,
            "\n".join(map(str, violations)),
            source=agent.ANALYSIS,
        )
        return {"status": "error", "error": error}

    def _on_event(self, task: Task, what: str) -> None:
        """agent.supervise's loop body, for one task."""
        if what == "exit":
            code = task.watch.poll()
            if code is None:
                return  # a stop, not an exit
            task.state.exit_code = code
            self.selector.unregister(task.watch.fd)
            if task.stopped:
                self._complete(task)
            else:
                self._stop(task)
            return
        task.pipe_open = agent._drain(task.read_fd, task.state, task.task["limits"]["outputBytes"])
        if not task.pipe_open:
            self.selector.unregister(task.read_fd)
        if task.state.overflowed:
            self._stop(task)

    def _stop(self, task: Task) -> None:
        """The end of agent.supervise: last drain, kill the session, then the reaping."""
        task.stopped = True
        if task.pipe_open:
            self.selector.unregister(task.read_fd)
            if not task.state.overflowed:
                # The child is gone; what it wrote is in the pipe buffer. A grandchild
                # may still hold the write end, so never wait for EOF here.
                agent._drain(task.read_fd, task.state, task.task["limits"]["outputBytes"])
            task.pipe_open = False
        # Every path ends here, success included: nothing the task started outlives it.
        agent.stop_task_processes(task.pid, own_pid_namespace=False)
        if task.state.exit_code is not None:
            self._complete(task)
            return
        # Killed; reaped within milliseconds, but never wait for it here (others run):
        # the exit event completes it, or the reap deadline does.
        task.deadline = time.monotonic() + agent.REAP_TIMEOUT_S

    def _complete(self, task: Task) -> None:
        task.done = True
        del self.tasks[task.number]
        if task.state.exit_code is None:
            self.selector.unregister(task.watch.fd)
        task.watch.close()
        os.close(task.read_fd)
        run_ms = (time.monotonic() - task.started) * 1000
        envelope = agent.interpret(task.state, task.task)
        envelope["stats"] = {
            "childExitCode": task.state.exit_code,
            "runMs": round(run_ms, 3),
            "oomKilled": None,  # no cgroup of its own to read
            "pidsLimitHit": None,
            "printsDropped": envelope.pop("printsDropped"),
        }
        self._answer(task.number, envelope)

    def _answer(self, number: int, envelope: dict[str, Any]) -> None:
        """What agent.main writes to stdout, behind the task's number."""
        prints = envelope.pop("prints", [])
        envelope["version"] = VERSION
        envelope.setdefault("stats", {})["agentUndumpable"] = self.undumpable
        try:
            body = encode_result(envelope, prints)
        except (TypeError, ValueError, RecursionError) as exc:
            error = agent._error(
                "agent_error", f"Agent could not encode the result: {exc}", source=agent.AGENT
            )
            body = dumps({"version": VERSION, "status": "error", "error": error})
        write_all(STDOUT_FD, NUMBER.pack(number) + encode_frame(body))


def main() -> int:
    if not hasattr(os, "pidfd_open"):
        # The agent's SIGCHLD fallback assumes one child; this serves many at once.
        print("forkserver: needs os.pidfd_open (Linux 5.3+)", file=sys.stderr)
        return 2
    server = Server()
    # Everything imported and built so far is permanent: a collection in a child
    # leaves those objects alone instead of writing to (and copying) their pages.
    gc.freeze()
    try:
        server.serve()
    except BrokenPipeError:
        return 0  # the benchmark went away
    return 0


if __name__ == "__main__":
    sys.exit(main())
