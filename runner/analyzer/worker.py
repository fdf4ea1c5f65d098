"""The analysis worker: the process that parses a tenant's code, under its own limits.

Owns: the job of :mod:`runner.analyzer.pool`'s workers -- one piece of code parsed
with :func:`runner.analyzer.core.analyze` under the pool's import policy -- and how a
job that hit the memory limit is told apart from code with a syntax error. The limits
themselves and the job loop are :mod:`runner.workers.child`'s.

Runs as its own interpreter (started by :class:`runner.workers.pool.WorkerPool`, an
empty environment, no tenant code ever *executes* here). ``ast.parse`` holds about
500 bytes of memory and 3 us of CPU per byte of code: the limits keep that from the
runner's memory and the event loop's CPU.

Must not import: asyncio, pydantic, docker, the sandbox.
"""

from __future__ import annotations

import sys
from typing import Any

from runner.analyzer.core import ImportPolicy, analyze
from runner.workers import child
from runner.workers.child import peak_rss_bytes

#: A MemoryError with the peak above this share of the limit is the limit; below it, it
#: is CPython's parser refusing deep nesting ("MemoryError" with no message either).
MEMORY_LIMIT_SHARE = 0.5


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


def main(argv: list[str]) -> None:
    """``worker MEMORY_BYTES CPU_S``: serve jobs on stdin, answers on stdout."""
    child.main(argv, answer)


if __name__ == "__main__":
    main(sys.argv[1:])
