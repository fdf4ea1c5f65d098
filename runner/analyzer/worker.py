"""The analysis worker: the process that parses a tenant's code, under its own limits.

Owns: the worker side of :mod:`runner.analyzer.pool` -- the limits a worker sets on
itself before it reads any code (``RLIMIT_AS`` for memory, ``RLIMIT_CPU`` re-armed
for every job, no core files), the job loop (one JSON job in, one JSON answer out,
each framed with a 4-byte big-endian length, over stdin and stdout) and how a job
that hit a limit is told apart from code with a syntax error.

Runs as its own interpreter (``python -c`` started by the pool, an empty
environment, no tenant code ever *executes* here): the worker only parses it with
:func:`runner.analyzer.core.analyze`. The limits are not a sandbox around hostile
code; they bound what hostile *input* can cost the parser (``ast.parse`` holds about
500 bytes of memory and 3 us of CPU per byte of code) so that it cannot take the
runner's memory or the event loop's CPU.

Must not import: asyncio, pydantic, docker, the sandbox.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import sys
from typing import Any, BinaryIO

from runner.analyzer.core import ImportPolicy, analyze

#: Past this share of its memory limit a worker answers, then exits: the next job gets
#: a fresh process (CPython keeps freed arenas), and a MemoryError in a fresh process
#: can only come from the limit if the peak neared it.
RETIRE_AT_SHARE = 0.25
#: A MemoryError with the peak above this share of the limit is the limit; below it, it
#: is CPython's parser refusing deep nesting ("MemoryError" with no message either).
MEMORY_LIMIT_SHARE = 0.5
HEADER = struct.Struct(">I")


def peak_rss_bytes() -> int:
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
    the middle of ``ast.parse`` (a Python handler would only run after the parse).
    The pool reads that death as ``cpu``. The hard limit stays: only our own code
    runs here, so re-arming needs no privilege and gives nothing to anyone.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(cpu_seconds() + cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def answer(job: dict[str, Any], memory_bytes: int) -> dict[str, Any]:
    """The verdict on one job, as JSON-ready data."""
    policy = ImportPolicy(frozenset(job["stdlib"]), frozenset(job["external"]))
    try:
        violations = analyze(job["code"], policy)
    except MemoryError:
        return {"limit": "memory"}
    except SyntaxError as exc:
        if (
            isinstance(exc.__context__, MemoryError)
            and peak_rss_bytes() >= memory_bytes * MEMORY_LIMIT_SHARE
        ):
            return {"limit": "memory"}
        return {"syntaxError": str(exc)}
    return {"violations": [[v.line, v.message] for v in violations]}


def read_frame(stream: BinaryIO) -> bytes | None:
    """One framed message, or ``None`` at EOF (the pool closed the pipe)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    body = stream.read(length)
    return body if len(body) == length else None


def serve(jobs: BinaryIO, results: BinaryIO, memory_bytes: int, cpu_s: float) -> None:
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
            reply = {"limit": "memory"}  # e.g. decoding the job itself
        del raw
        retire = peak_rss_bytes() >= memory_bytes * RETIRE_AT_SHARE
        reply["retire"] = retire
        # ensure_ascii: a message quoting code with a lone surrogate stays encodable.
        body = json.dumps(reply, ensure_ascii=True).encode("ascii")
        results.write(HEADER.pack(len(body)) + body)
        results.flush()
        if retire:
            return


def main(argv: list[str]) -> None:
    """``worker MEMORY_BYTES CPU_S``: serve jobs on stdin, answers on stdout."""
    memory_bytes, cpu_s = int(argv[0]), float(argv[1])
    # Answers go to a private copy of stdout; fd 1 itself then points at stderr, so a
    # stray write by anything else can never corrupt the framing.
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, results, memory_bytes, cpu_s)


if __name__ == "__main__":
    main(sys.argv[1:])
