"""``ProcessSandbox``: the real agent as a plain host process. **No isolation.**

It runs exactly the code that runs inside the task image (staged from
``sandbox_image/``), with the same framing, guards, timeouts and result
interpretation, but without any container around it, one process started per task.
It exists for fast unit tests of everything above the container boundary, and for
the benchmark's extra line (a'): a task that pays an interpreter start on the host.
It is not the benchmark's forkserver baseline (a), which forks each task from one
long-lived process (``bench/forkserver/``). Never use it for untrusted code.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from runner.sandbox.base import ExecutionResult, Limits, TaskSpec
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

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
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
        result.durations_ms["run"] = (time.monotonic() - started) * 1000
        return result

    async def aclose(self) -> None:
        self._staging.cleanup()


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
