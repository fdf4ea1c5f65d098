"""``ProcessSandbox``: the real agent as a plain host process. **No isolation.**

It runs exactly the code that runs inside the task image (staged from
``sandbox_image/``), with the same framing, guards, timeouts and result
interpretation, but without any container around it, one process started per task.
It exists for fast unit tests of everything above the container boundary, and for
the benchmark's extra line (a'): a task that pays an interpreter start on the host.
It is not the benchmark's forkserver baseline (a), which forks each task from one
long-lived process (``bench/forkserver/``). Never use it for untrusted code.

A cancel stops the task as the agent itself would (SIGKILL to its child's session:
the child made one of its own) and the agent with it; ``run`` then answers
``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from runner.sandbox.base import ExecutionResult, Limits, TaskSpec, cancelled_result
from runner.sandbox.bundle import stage_agent
from runner.sandbox.envelope import encode_task
from runner.sandbox.interpret import ProcessFacts, interpret

STDERR_TAIL_BYTES = 64 * 1024


class ProcessSandbox:
    """Runs the agent with ``python -I -B`` on the host. For tests and benchmarks only."""

    def __init__(self, image_dir: Path, *, python: str = sys.executable, grace_s: float = 5.0):
        self._staging = tempfile.TemporaryDirectory(prefix="sandbox-agent-")
        self._entry = stage_agent(image_dir, Path(self._staging.name))
        self._python = python
        self._grace_s = grace_s
        self._running: dict[str, asyncio.subprocess.Process] = {}
        # Marked first, then looked up (as ContainerSandbox does): a cancel that comes
        # while the agent is being started stops it as soon as it exists.
        self._cancelled: set[str] = set()

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        try:
            return await self._run(spec, limits)
        finally:
            self._running.pop(spec.task_id, None)
            self._cancelled.discard(spec.task_id)

    async def cancel(self, task_id: str) -> bool:
        """Stop the task's child and its agent; its ``run`` then ends ``cancelled``."""
        self._cancelled.add(task_id)
        process = self._running.get(task_id)
        if process is None or process.returncode is not None:
            return False
        _stop(process)
        return True

    async def _run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            self._python,
            "-I",
            "-B",
            str(self._entry),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        assert process.stdin
        assert process.stdout
        assert process.stderr
        self._running[spec.task_id] = process
        if spec.task_id in self._cancelled:
            _stop(process)
        process.stdin.write(encode_task(spec, limits))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await process.stdin.drain()
            process.stdin.close()
        cap = limits.output_bytes + 1024 * 1024  # room for the envelope around the result
        readers = asyncio.gather(
            _read_capped(process.stdout, cap, process.kill),
            _read_capped(process.stderr, cap, process.kill),
        )
        timed_out = False
        try:
            async with asyncio.timeout(limits.timeout_s + self._grace_s):
                (stdout, out_over), (stderr, err_over) = await readers
                await process.wait()
        except TimeoutError:
            timed_out = True
            stdout, stderr, out_over, err_over = b"", b"", False, False
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        facts = ProcessFacts(
            exit_code=process.returncode,
            timed_out=timed_out,
            output_overflow=out_over or err_over,
            stderr_tail=stderr[-STDERR_TAIL_BYTES:].decode("utf-8", "replace"),
        )
        result = interpret(stdout, facts, limits, max_print_calls=spec.guards.max_print_calls)
        if spec.task_id in self._cancelled:
            result = cancelled_result(result.prints)
        result.durations_ms["run"] = (time.monotonic() - started) * 1000
        return result

    async def aclose(self) -> None:
        self._staging.cleanup()


def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the task: the session of each child of the agent (the task's child calls
    ``setsid``, so its session is its pid), each child itself (in case it has not yet),
    then the agent. What the agent's children are is read from ``/proc``; without it,
    only the agent is killed (its child then runs on to its end, unsupervised)."""
    children: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        path = f"/proc/{process.pid}/task/{process.pid}/children"
        with open(path, encoding="ascii") as listing:
            children = [int(pid) for pid in listing.read().split()]
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def _read_capped(
    stream: asyncio.StreamReader, cap: int, on_overflow: Callable[[], None]
) -> tuple[bytes, bool]:
    """Read to EOF, keeping at most ``cap`` bytes; past the cap, stop the writer."""
    data = bytearray()
    overflow = False
    while chunk := await stream.read(1 << 16):
        if len(data) + len(chunk) > cap:
            overflow = True
            data += chunk[: cap - len(data)]
            on_overflow()
            break
        data += chunk
    return bytes(data), overflow
