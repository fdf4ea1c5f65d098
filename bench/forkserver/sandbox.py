"""``ForkserverSandbox``: way (a), tasks forked from one long-lived host process.

**No isolation between tasks or from the host**: a benchmark baseline, never a way to
run untrusted code. It is the strongest real alternative to a container per task --
what n8n's own Python runner does -- done as well as we can: the server
(:mod:`bench.forkserver.server`) is started once, has the interpreter and every module
a task needs loaded, and forks one child per task that runs the agent's own child
code; it supervises any number of tasks at once.

This side is a :class:`~runner.sandbox.base.Sandbox`, so the benchmark drives it through
the same pipeline as the containers: the same analyzer, task envelope, result envelope
and :func:`~runner.sandbox.interpret.interpret`. Owns the server process, the
numbering of requests and matching the answers to them, the host-side deadline and
output cap, as the other sandboxes have them, and cancelling a task (a cancel request
to the server, which stops it as the agent would).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

from runner.errors import InfrastructureError
from runner.sandbox.base import ExecutionResult, Limits, TaskSpec, cancelled_result
from runner.sandbox.bundle import stage_agent
from runner.sandbox.envelope import HEADER, encode_task
from runner.sandbox.interpret import ProcessFacts, interpret

SERVER_SOURCE = Path(__file__).with_name("server.py")
SERVER_SCRIPT = "forkserver.py"  # staged beside the agent bundle
NUMBER_BYTES = 4
CANCEL = 1 << 31  # in a request's number: stop that task (as in server.py)
STDERR_TAIL_BYTES = 64 * 1024
ANSWER_HEADROOM_BYTES = 1024 * 1024  # room for the envelope around the result
START_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0

Waiter = asyncio.Future[tuple[bytes, bool]]


class ForkserverSandbox:
    """One forkserver process for the sandbox's life. For benchmarks and tests only."""

    def __init__(
        self, process: asyncio.subprocess.Process, staging: tempfile.TemporaryDirectory[str]
    ) -> None:
        self._process = process
        self._staging = staging
        self._grace_s = 5.0
        self._numbers = itertools.count(1)
        self._waiting: dict[int, tuple[Waiter, int]] = {}
        self._numbers_of: dict[str, int] = {}  # task id -> its request's number, while it runs
        # Marked first, then looked up (as ContainerSandbox does): a cancel that comes
        # before the task is sent stops it before it starts.
        self._cancelled: set[str] = set()
        self._stderr = bytearray()
        self._failure: InfrastructureError | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers = [
            asyncio.create_task(self._read_answers()),
            asyncio.create_task(self._read_stderr()),
        ]

    @classmethod
    async def start(
        cls, image_dir: Path, *, python: str = sys.executable, grace_s: float = 5.0
    ) -> ForkserverSandbox:
        """Stage the agent, start the server, and return once it has loaded everything."""
        staging = tempfile.TemporaryDirectory(prefix="forkserver-")
        stage_agent(image_dir, Path(staging.name))
        script = Path(staging.name) / SERVER_SCRIPT
        shutil.copyfile(SERVER_SOURCE, script)
        process = await asyncio.create_subprocess_exec(
            python,
            "-I",
            "-B",
            str(script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},  # as ProcessSandbox's agent
        )
        sandbox = cls(process, staging)
        sandbox._grace_s = grace_s
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await sandbox._ready
        except BaseException:
            await sandbox.aclose()
            raise
        return sandbox

    @property
    def script(self) -> str:
        """The staged server script: the command line of the server and its children."""
        return str(Path(self._staging.name) / SERVER_SCRIPT)

    @property
    def pid(self) -> int:
        """The server's process id (its CPU and that of the children it reaped is the way's)."""
        return self._process.pid

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        try:
            if spec.task_id in self._cancelled:
                return cancelled_result([])
            result = await self._run(spec, limits)
            return cancelled_result(result.prints) if spec.task_id in self._cancelled else result
        finally:
            self._cancelled.discard(spec.task_id)

    async def cancel(self, task_id: str) -> bool:
        """Ask the server to stop the task now; its ``run`` then ends ``cancelled``."""
        self._cancelled.add(task_id)
        number = self._numbers_of.get(task_id)
        stdin = self._process.stdin
        if number is None or stdin is None or stdin.is_closing():
            return False
        stdin.write((number | CANCEL).to_bytes(NUMBER_BYTES, "big") + HEADER.pack(0))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.drain()  # a server that is gone fails the task's run anyway
        return True

    async def _run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        if self._failure is not None:
            raise self._failure
        assert self._process.stdin is not None
        started = time.monotonic()
        number = next(self._numbers)
        self._numbers_of[spec.task_id] = number
        waiter: Waiter = asyncio.get_running_loop().create_future()
        self._waiting[number] = (waiter, limits.output_bytes + ANSWER_HEADROOM_BYTES)
        answer, overflow, timed_out = b"", False, False
        try:
            self._process.stdin.write(number.to_bytes(NUMBER_BYTES, "big"))
            self._process.stdin.write(encode_task(spec, limits))
            # The server's own deadline comes first; this one is for a stuck server.
            async with asyncio.timeout(limits.timeout_s + self._grace_s):
                await self._process.stdin.drain()
                answer, overflow = await waiter
        except TimeoutError:
            timed_out = True
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._failed("the forkserver stopped reading tasks") from exc
        finally:
            self._waiting.pop(number, None)
            if self._numbers_of.get(spec.task_id) == number:
                del self._numbers_of[spec.task_id]
        # No agent process ends per task: there is no exit code to report, and the
        # children's stderr is the server's (the child's own stderr text comes in its
        # message, as in the container).
        facts = ProcessFacts(exit_code=None, timed_out=timed_out, output_overflow=overflow)
        result = interpret(answer, facts, limits, max_print_calls=spec.guards.max_print_calls)
        result.durations_ms["run"] = (time.monotonic() - started) * 1000
        return result

    async def aclose(self) -> None:
        """End the server (it kills what is still running) and remove the staged agent."""
        if self._process.stdin is not None and not self._process.stdin.is_closing():
            self._process.stdin.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._staging.cleanup()

    # -- the server's output -----------------------------------------------------------

    async def _read_answers(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            while True:
                number = int.from_bytes(await stdout.readexactly(NUMBER_BYTES), "big")
                header = await stdout.readexactly(HEADER.size)
                length: int = HEADER.unpack(header)[0]
                if number == 0:
                    self._ready.set_result(None)
                    continue
                waiter, cap = self._waiting.get(number, (None, 0))
                if length > cap:
                    # Past the host's cap the bytes are skipped unread, as the other
                    # sandboxes stop reading a container's output.
                    await _skip(stdout, length)
                    answer, overflow = b"", True
                else:
                    answer, overflow = header + await stdout.readexactly(length), False
                if waiter is not None and not waiter.done():
                    waiter.set_result((answer, overflow))
        except asyncio.IncompleteReadError:
            with contextlib.suppress(TimeoutError):  # its last words, for the error
                await asyncio.wait_for(asyncio.shield(self._readers[1]), 1.0)
            failure = self._failed("the forkserver exited")
            if not self._ready.done():
                self._ready.set_exception(failure)
            for waiter, _ in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(failure)

    async def _read_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        while chunk := await stderr.read(1 << 16):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL_BYTES]

    def _failed(self, what: str) -> InfrastructureError:
        tail = self._stderr.decode("utf-8", "replace").strip()[-2000:]
        self._failure = InfrastructureError(what, hint=tail or None)
        return self._failure


async def _skip(stream: asyncio.StreamReader, count: int) -> None:
    while count:
        count -= len(await stream.readexactly(min(count, 1 << 16)))
