"""A worker process's side of :mod:`runner.workers.pool`: its limits and its job loop.

Owns: the limits a worker sets on itself before it reads any job (``RLIMIT_AS`` for
memory, ``RLIMIT_CPU`` re-armed for every job, no core files), the job loop (one JSON
job in, one JSON answer out, each framed with a 4-byte big-endian length, over stdin
and stdout), retiring a worker whose peak memory grew, and a job that ran out of
memory told as ``{"limit": "memory"}``.

What a job means is the caller's: a worker module (``runner.analyzer.worker``,
``runner.broker_server.schema_worker``) gives :func:`main` its ``answer`` function.
The limits are not a sandbox around hostile *code* (none runs here); they bound what
hostile *input* can cost the parser or validator that reads it, so that it cannot
take the parent's memory or the event loop's CPU.

Imports the standard library only (no asyncio: a worker is one plain loop).
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

#: Past this share of its memory limit a worker answers, then exits: the next job gets
#: a fresh process (CPython keeps freed arenas), and a MemoryError in a fresh process
#: can only come from the limit if the peak neared it.
RETIRE_AT_SHARE = 0.25
HEADER = struct.Struct(">I")

#: ``answer(job, memory_bytes)``: one job's answer, as JSON-ready data.
Answer = Callable[[dict[str, Any], int], dict[str, Any]]


def peak_rss_bytes() -> int:
    """The most memory this worker has held (resident), in bytes.

    ``VmHWM`` of this process image: ``getrusage``'s ``ru_maxrss`` survives ``execve``,
    so in a worker forked from a large parent it is the *parent's* size, and a worker
    would retire (or take a parse's MemoryError for its limit) after every job.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def limit_self(memory_bytes: int) -> None:
    """The limits set before any job is read; they only ever tighten."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        memory_bytes = min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def arm_cpu_limit(cpu_s: float) -> None:
    """``RLIMIT_CPU`` counts the whole life of the process: re-arm it for this job.

    The soft limit is raised to what the worker used so far plus this job's budget;
    past it the kernel sends SIGXCPU, whose default action ends the worker even in
    the middle of one long C call (a Python handler would only run after it). The
    pool reads that death as ``cpu``. The hard limit stays: only our own code runs
    here, so re-arming needs no privilege and gives nothing to anyone.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(cpu_seconds() + cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def read_frame(stream: BinaryIO) -> bytes | None:
    """One framed message, or ``None`` at EOF (the pool closed the pipe)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    body = stream.read(length)
    return body if len(body) == length else None


def serve(
    jobs: BinaryIO, results: BinaryIO, memory_bytes: int, cpu_s: float, answer: Answer
) -> None:
    """The worker's life: limits first, then one answer per job until EOF or retirement."""
    limit_self(memory_bytes)
    while True:
        raw = read_frame(jobs)
        if raw is None:
            return
        arm_cpu_limit(cpu_s)
        try:
            reply = answer(json.loads(raw), memory_bytes)
        except MemoryError:
            reply = {"limit": "memory"}  # in the job, or decoding the job itself
        del raw
        retire = peak_rss_bytes() >= memory_bytes * RETIRE_AT_SHARE
        reply["retire"] = retire
        # ensure_ascii: a message quoting input with a lone surrogate stays encodable.
        body = json.dumps(reply, ensure_ascii=True).encode("ascii")
        results.write(HEADER.pack(len(body)) + body)
        results.flush()
        if retire:
            return


def main(argv: list[str], answer: Answer) -> None:
    """``MEMORY_BYTES CPU_S``: serve jobs on stdin with ``answer``, answers on stdout."""
    memory_bytes, cpu_s = int(argv[0]), float(argv[1])
    # Answers go to a private copy of stdout; fd 1 itself then points at stderr, so a
    # stray write by anything else can never corrupt the framing.
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, results, memory_bytes, cpu_s, answer)
