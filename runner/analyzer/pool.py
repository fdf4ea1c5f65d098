"""Analysis off the event loop: a small pool of worker processes with their own limits.

Owns: :class:`AnalysisPool` -- which code is analyzed inline and which in a worker,
the workers' lives (started lazily, replaced when one dies, retires or is killed),
the limits they run under, and the verdict a task gets when its analysis hit one of
them.

Why processes: ``ast.parse`` holds the interpreter for its whole run (a thread does
not help: the GIL), and costs ~3 us of CPU and ~500 bytes of memory per byte of
code. Inline, one tenant's 8 MB of code stalled every other tenant's task for 35 s
and would take ~4 GB of the runner's memory. In a worker it costs that worker
only, within ``RLIMIT_AS`` and a CPU-time budget, and the event loop keeps serving.
Tiny code (:data:`INLINE_MAX_CHARS`) is still analyzed inline: a round trip to a
worker costs more than parsing it, and its worst case is a few milliseconds.

The verdict cache stays in the runner (:class:`~runner.analyzer.cache.Analyzer`): a
repeated code costs a hash, not a worker. Verdicts of the CPU and memory limits are
cached like any other (the same code hits them again); a worker that crashed or was
killed for wall time is not held against the code.

A worker that dies, exceeds a limit or is cancelled mid-job is discarded (its task
gets a verdict with ``limit_exceeded``) and the next job starts a fresh one; no
other task is affected. Waiting for an answer uses the event loop's reader on the
pipe, never a thread blocked for the whole analysis.

Must not import: pydantic, docker, the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from runner.analyzer.cache import Analyzer, Verdict
from runner.analyzer.core import ImportPolicy, Violation
from runner.analyzer.worker import HEADER

log = logging.getLogger(__name__)

#: Code up to this many characters is analyzed inline. Measured on the reference host
#: (docs/reliability.md, "Analysis off the event loop"): a small task (~100 bytes)
#: takes 0.12 ms inline and 0.24 ms through a worker (p95 0.36 ms); parsing costs
#: ~2.7 us per byte at worst (many short statements or calls), so 1 KiB holds the
#: event loop for ~3 ms at most, and larger code is cheaper in a worker.
INLINE_MAX_CHARS = 1024
#: Code up to this many characters goes to the small lane (at most ~0.2 s to parse):
#: it never waits behind large code, which has a lane of its own.
SMALL_LANE_MAX_CHARS = 64 * 1024
#: Workers per lane: one per core of the reference host (2); more would only share
#: the cores.
DEFAULT_WORKERS = 2
#: CPU seconds one analysis may take: twice the slowest parse measured per byte of
#: the largest code the lane accepts (1 MiB of short tuples or f-strings: 5.3 s), and
#: never less than MIN_CPU_S. A hostile input is stopped long before it matters.
CPU_S_PER_CODE_BYTE = 10e-6
MIN_CPU_S = 5.0
#: Memory of a worker: its own start-up footprint plus this much per byte of the
#: largest code it must accept (measured: up to ~500 bytes per byte; twice that, since
#: RLIMIT_AS counts address space, not resident pages).
WORKER_BASE_BYTES = 96 * 1024 * 1024
WORKER_BYTES_PER_CODE_BYTE = 1024
#: Wall-clock backstop: a worker that neither answers nor dies by its CPU limit within
#: this multiple of the CPU budget (a stopped or starved process) is killed.
WALL_FACTOR = 4.0

LIMIT_MESSAGES = {
    "memory": "it needed more than the analyzer's memory limit of {memory_mib} MiB",
    "cpu": "it needed more than the analyzer's CPU-time limit of {cpu_s:g} s",
    "wall": "the analyzer did not answer within {wall_s:g} s",
    "crashed": "the analyzer's worker process died ({how})",
}


def worker_memory_bytes(code_bytes: int) -> int:
    """``RLIMIT_AS`` of a worker that must analyze code of up to ``code_bytes``."""
    return WORKER_BASE_BYTES + code_bytes * WORKER_BYTES_PER_CODE_BYTE


def worker_cpu_s(code_bytes: int) -> float:
    """CPU seconds of one analysis of code of up to ``code_bytes``."""
    return max(MIN_CPU_S, code_bytes * CPU_S_PER_CODE_BYTE)


# The worker runs from the directory that holds the ``runner`` package (a checkout or
# site-packages), with no environment at all: it needs none, and the runner's holds
# secrets (the broker's auth token).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
_WORKER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from runner.analyzer.worker import main; main(sys.argv[2:])"
)


@dataclass(slots=True, eq=False)  # identity: a worker is a process, not a value
class _Worker:
    process: subprocess.Popen[bytes]
    jobs: int  # fd the runner writes jobs to (non-blocking)
    results: int  # fd the runner reads answers from (non-blocking)


def _kill(worker: _Worker) -> None:
    """Kill and reap a worker, close its pipes. Blocking, but only for a moment."""
    with contextlib.suppress(ProcessLookupError):
        worker.process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(5.0)
    for stream in (worker.process.stdin, worker.process.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:
                stream.close()


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        _kill(worker)
    workers.clear()


@dataclass(slots=True)
class _Lane:
    """Workers for code up to ``max_chars``, at most ``size`` at once."""

    max_chars: int
    size: int
    memory_bytes: int
    cpu_s: float
    idle: list[_Worker] = field(default_factory=list)
    slots: asyncio.Semaphore | None = None


class AnalysisPool:
    """Analyzes task code in worker processes (all but tiny code), caching verdicts.

    Two lanes of workers, each with its own slots: code up to
    :data:`SMALL_LANE_MAX_CHARS` (milliseconds to parse) and larger code (up to
    seconds). Hostile large code can fill its own lane only: a tenant's ordinary
    task never queues behind another tenant's megabyte.

    One pool per pipeline. Workers are started when first needed; :meth:`aclose`
    stops them, and so does the pool's finalizer (garbage collection, interpreter
    exit), so a pipeline nobody closes leaves no process behind. A worker whose
    runner died reads EOF on its stdin and exits. A pool may be used from one event
    loop at a time; a new loop (a test, a second ``asyncio.run``) gets fresh workers.
    """

    def __init__(
        self,
        *,
        code_bytes: int,
        workers: int = DEFAULT_WORKERS,
        cpu_s: float | None = None,
        memory_bytes: int | None = None,
        inline_max_chars: int = INLINE_MAX_CHARS,
    ) -> None:
        """``cpu_s`` and ``memory_bytes`` override every worker's CPU budget and
        ``RLIMIT_AS`` (default: :func:`worker_cpu_s`, :func:`worker_memory_bytes`)."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.inline_max_chars = inline_max_chars
        small = min(SMALL_LANE_MAX_CHARS, code_bytes)
        self._lanes = tuple(
            _Lane(
                max_chars,
                workers,
                worker_memory_bytes(max_chars) if memory_bytes is None else memory_bytes,
                worker_cpu_s(max_chars) if cpu_s is None else cpu_s,
            )
            for max_chars in (small, code_bytes)
        )
        self._all: set[_Worker] = set()  # idle and busy: what the finalizer stops
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer = weakref.finalize(self, _kill_all, self._all)
        self.started = 0  # workers started over the pool's life (tests, metrics)

    @property
    def memory_bytes(self) -> int:
        """``RLIMIT_AS`` of a worker of the large lane (the most any worker gets)."""
        return self._lanes[-1].memory_bytes

    @property
    def cpu_s(self) -> float:
        """CPU budget of an analysis in the large lane (the most any analysis gets)."""
        return self._lanes[-1].cpu_s

    async def check(self, analyzer: Analyzer, code: str) -> Verdict:
        """The verdict on ``code`` under ``analyzer``'s policy, never holding the loop long."""
        if len(code) <= self.inline_max_chars:
            return analyzer.check(code)  # tiny: about as cheap as a round trip, bounded
        cached = analyzer.lookup(code)
        if cached is not None:
            return cached
        verdict, cacheable = await self._in_worker(code, analyzer.policy)
        if cacheable:
            analyzer.store(code, verdict)
        return verdict

    async def aclose(self) -> None:
        """Stop every worker."""
        workers = list(self._all)
        self._all.clear()
        for lane in self._lanes:
            lane.idle.clear()
        for worker in workers:
            await asyncio.to_thread(_kill, worker)

    # -- one job ----------------------------------------------------------------------

    async def _in_worker(self, code: str, policy: ImportPolicy) -> tuple[Verdict, bool]:
        self._bind_to_running_loop()
        small, large = self._lanes
        lane = small if len(code) <= small.max_chars else large
        assert lane.slots is not None
        async with lane.slots:
            worker = lane.idle.pop() if lane.idle else await self._start(lane)
            keep = False
            try:
                verdict, cacheable, keep = await self._job(worker, lane, code, policy)
                return verdict, cacheable
            finally:
                # Died, retired, killed or cancelled mid-job (its pipe may still hold
                # half an answer): never reused.
                if keep and worker in self._all:
                    lane.idle.append(worker)
                else:
                    self._all.discard(worker)
                    await asyncio.shield(asyncio.to_thread(_kill, worker))

    async def _job(
        self, worker: _Worker, lane: _Lane, code: str, policy: ImportPolicy
    ) -> tuple[Verdict, bool, bool]:
        """(verdict, cacheable, keep the worker)."""
        body = json.dumps(
            {
                "code": code,
                "stdlib": sorted(policy.stdlib_allow),
                "external": sorted(policy.external_allow),
            },
            ensure_ascii=True,  # a lone surrogate travels as an escape
        ).encode("ascii")
        wall_s = lane.cpu_s * WALL_FACTOR + 5.0
        try:
            async with asyncio.timeout(wall_s):
                await _write_all(worker.jobs, HEADER.pack(len(body)) + body)
                del body
                raw = await _read_frame(worker.results)
        except TimeoutError:
            log.warning("analysis worker gave no answer in %.0f s; killed", wall_s)
            return self._limit("wall", lane), False, False
        if raw is None:  # EOF: the worker died
            how = await self._death(worker)
            if how == "cpu":
                return self._limit("cpu", lane), True, False
            log.warning("analysis worker died: %s", how)
            return self._limit("crashed", lane, how=how), False, False
        reply = json.loads(raw)
        keep = not reply.get("retire", False)
        if "limit" in reply:
            return self._limit(str(reply["limit"]), lane), True, keep
        if "syntaxError" in reply:
            return Verdict(syntax_error=str(reply["syntaxError"])), True, keep
        violations = tuple(Violation(int(line), str(text)) for line, text in reply["violations"])
        return Verdict(violations=violations), True, keep

    def _limit(self, kind: str, lane: _Lane, *, how: str = "") -> Verdict:
        reason = LIMIT_MESSAGES[kind].format(
            memory_mib=lane.memory_bytes // (1024 * 1024),
            cpu_s=lane.cpu_s,
            wall_s=lane.cpu_s * WALL_FACTOR + 5.0,
            how=how,
        )
        return Verdict(limit_exceeded=f"Task code could not be analyzed: {reason}")

    async def _death(self, worker: _Worker) -> str:
        """How a worker whose pipe closed ended: ``cpu`` or a description."""
        try:
            code = await asyncio.to_thread(worker.process.wait, 5.0)
        except subprocess.TimeoutExpired:
            return "it closed its pipe but did not exit"
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            return "cpu"  # SIGXCPU at the soft CPU limit (SIGKILL at the hard one)
        if code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit status {code}"

    # -- the workers --------------------------------------------------------------------

    def _bind_to_running_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        # First use, or a new loop: fresh semaphores (they belong to a loop), and the
        # old loop's idle workers go (a busy one is its job's to discard).
        self._loop = loop
        for lane in self._lanes:
            lane.slots = asyncio.Semaphore(lane.size)
            stale, lane.idle = lane.idle, []
            for worker in stale:
                self._all.discard(worker)
                _kill(worker)

    async def _start(self, lane: _Lane) -> _Worker:
        command = [
            sys.executable,
            "-s",  # no user site-packages
            "-c",
            _WORKER_MAIN,
            _PACKAGE_ROOT,
            str(lane.memory_bytes),
            repr(lane.cpu_s),
        ]
        process = await asyncio.to_thread(
            subprocess.Popen,
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            close_fds=True,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        worker = _Worker(process, process.stdin.fileno(), process.stdout.fileno())
        os.set_blocking(worker.jobs, False)
        os.set_blocking(worker.results, False)
        self._all.add(worker)
        self.started += 1
        return worker


# -- non-blocking pipe I/O on the event loop --------------------------------------------


async def _wait(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (
        (loop.add_writer, loop.remove_writer)
        if writable
        else (
            loop.add_reader,
            loop.remove_reader,
        )
    )
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def _write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting for room in the pipe on the loop (a dead reader: EOF
    is seen by the read that follows)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _wait(fd, writable=True)
            continue
        except BrokenPipeError:
            return
        view = view[written:]


async def _read_frame(fd: int) -> bytes | None:
    """One framed answer, or ``None`` at EOF."""
    buffer = bytearray()
    need = HEADER.size
    length: int | None = None
    while True:
        while len(buffer) < need:
            try:
                chunk = os.read(fd, max(need - len(buffer), 65536))
            except BlockingIOError:
                await _wait(fd, writable=False)
                continue
            if not chunk:
                return None
            buffer += chunk
        if length is None:
            (length,) = HEADER.unpack_from(buffer)
            need = HEADER.size + length
            continue
        return bytes(buffer[HEADER.size : need])
