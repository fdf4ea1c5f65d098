"""Worker processes off the event loop, each under its own CPU-time and memory limit.

Owns: :class:`WorkerPool` -- the workers' lives (started lazily, replaced when one
dies, retires, is killed or is cancelled mid-job, all stopped by :meth:`aclose` or by
the pool's finalizer), lanes of workers with their own slots (work of one kind cannot
queue behind work of another), one job's round trip over non-blocking pipes on the
event loop (never a thread blocked for the whole job), and what became of a job that
hit a limit (:class:`LimitHit`: ``memory``, ``cpu``, ``wall`` or ``crashed``).

What a job *is* belongs to the caller: the runner's analyzer
(:mod:`runner.analyzer.pool`, code parsed by ``runner.analyzer.worker``) and the
broker's schema checks (:mod:`runner.broker_server.schema_pool`, run by
``runner.broker_server.schema_worker``). A worker module has a ``main(argv)`` that
hands its ``answer`` to :func:`runner.workers.child.main`.

A worker runs as its own interpreter (``python -s -c``, started from the directory
that holds the ``runner`` package, with an empty environment: it needs none, and the
parent's holds secrets such as the broker's auth token). A worker whose parent died
reads EOF on its stdin and exits.

Imports the standard library only.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from runner.workers.child import HEADER

log = logging.getLogger(__name__)

#: Wall-clock backstop: a worker that neither answers nor dies by its CPU limit within
#: this multiple of the CPU budget, plus WALL_EXTRA_S (a stopped or starved process),
#: is killed.
WALL_FACTOR = 4.0
WALL_EXTRA_S = 5.0

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
_WORKER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import importlib; importlib.import_module(sys.argv[2]).main(sys.argv[3:])"
)


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """A lane: at most ``size`` workers at once, each with these limits."""

    size: int
    memory_bytes: int  # RLIMIT_AS of each worker
    cpu_s: float  # CPU seconds of one job

    @property
    def wall_s(self) -> float:
        return self.cpu_s * WALL_FACTOR + WALL_EXTRA_S


class Limit(StrEnum):
    """Which limit a job hit."""

    MEMORY = "memory"  # RLIMIT_AS: a MemoryError in the job (the input's cost)
    CPU = "cpu"  # RLIMIT_CPU: SIGXCPU (the input's cost)
    WALL = "wall"  # no answer within LaneSpec.wall_s: killed
    CRASHED = "crashed"  # the worker died otherwise


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A job that got no answer: the limit it hit (``how``: how a crashed worker ended)."""

    kind: Limit
    how: str = ""

    @property
    def is_the_inputs(self) -> bool:
        """The input's own cost (the same input hits it again), not a worker's fault."""
        return self.kind in (Limit.MEMORY, Limit.CPU)


@dataclass(slots=True, eq=False)  # identity: a worker is a process, not a value
class _Worker:
    process: subprocess.Popen[bytes]
    jobs: int  # fd the parent writes jobs to (non-blocking)
    results: int  # fd the parent reads answers from (non-blocking)


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
    spec: LaneSpec
    idle: list[_Worker] = field(default_factory=list)
    slots: asyncio.Semaphore | None = None


class WorkerPool:
    """Lanes of worker processes running ``module``'s jobs, each lane with its slots.

    Workers are started when first needed; :meth:`aclose` stops them, and so does the
    pool's finalizer (garbage collection, interpreter exit), so a pool nobody closes
    leaves no process behind. A pool may be used from one event loop at a time; a new
    loop (a test, a second ``asyncio.run``) gets fresh workers.
    """

    def __init__(self, module: str, lanes: Sequence[LaneSpec]) -> None:
        if not lanes or any(lane.size < 1 for lane in lanes):
            raise ValueError(f"every lane needs at least 1 worker, got {list(lanes)}")
        self.module = module
        self._lanes = tuple(_Lane(spec) for spec in lanes)
        self._all: set[_Worker] = set()  # idle and busy: what the finalizer stops
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer = weakref.finalize(self, _kill_all, self._all)
        self.started = 0  # workers started over the pool's life (tests, metrics)

    def lane(self, index: int) -> LaneSpec:
        return self._lanes[index].spec

    @property
    def alive(self) -> int:
        """Worker processes the pool holds now (idle and busy)."""
        return len(self._all)

    def pids(self) -> list[int]:
        """Process ids of the workers the pool holds now (tests: none left behind)."""
        return [worker.process.pid for worker in self._all]

    async def run(self, lane_index: int, job: bytes) -> dict[str, Any] | LimitHit:
        """One job (JSON, ASCII) in a worker of the lane: its answer, or the limit hit.

        A worker that died, retired, was killed or was cancelled mid-job (its pipe may
        still hold half an answer) is discarded; the next job starts a fresh one.
        """
        self._bind_to_running_loop()
        lane = self._lanes[lane_index]
        assert lane.slots is not None
        async with lane.slots:
            worker = lane.idle.pop() if lane.idle else await self._start(lane.spec)
            keep = False
            try:
                outcome, keep = await self._job(worker, lane.spec, job)
                return outcome
            finally:
                if keep and worker in self._all:
                    lane.idle.append(worker)
                else:
                    self._all.discard(worker)
                    await asyncio.shield(asyncio.to_thread(_kill, worker))

    async def aclose(self) -> None:
        """Stop every worker."""
        workers = list(self._all)
        self._all.clear()
        for lane in self._lanes:
            lane.idle.clear()
        for worker in workers:
            await asyncio.to_thread(_kill, worker)

    # -- one job ----------------------------------------------------------------------

    async def _job(
        self, worker: _Worker, spec: LaneSpec, job: bytes
    ) -> tuple[dict[str, Any] | LimitHit, bool]:
        """(the answer or the limit hit, keep the worker)."""
        try:
            async with asyncio.timeout(spec.wall_s):
                await _write_all(worker.jobs, HEADER.pack(len(job)) + job)
                del job
                raw = await _read_frame(worker.results)
        except TimeoutError:
            log.warning("%s worker gave no answer in %.0f s; killed", self.module, spec.wall_s)
            return LimitHit(Limit.WALL), False
        if raw is None:  # EOF: the worker died
            how = await self._death(worker)
            if how == Limit.CPU:
                return LimitHit(Limit.CPU), False
            log.warning("%s worker died: %s", self.module, how)
            return LimitHit(Limit.CRASHED, how), False
        reply: dict[str, Any] = json.loads(raw)
        keep = not reply.pop("retire", False)
        if "limit" in reply:
            return LimitHit(Limit(reply["limit"])), keep
        return reply, keep

    async def _death(self, worker: _Worker) -> str:
        """How a worker whose pipe closed ended: ``cpu`` or a description."""
        try:
            code = await asyncio.to_thread(worker.process.wait, 5.0)
        except subprocess.TimeoutExpired:
            return "it closed its pipe but did not exit"
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            return Limit.CPU  # SIGXCPU at the soft CPU limit (SIGKILL at the hard one)
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
            lane.slots = asyncio.Semaphore(lane.spec.size)
            stale, lane.idle = lane.idle, []
            for worker in stale:
                self._all.discard(worker)
                _kill(worker)

    async def _start(self, spec: LaneSpec) -> _Worker:
        command = [
            sys.executable,
            "-s",  # no user site-packages
            "-c",
            _WORKER_MAIN,
            _PACKAGE_ROOT,
            self.module,
            str(spec.memory_bytes),
            repr(spec.cpu_s),
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
