"""The schema worker: the process that applies a caller's JSON Schema, under limits.

Owns: the job of :mod:`runner.broker_server.schema_pool`'s workers -- one check of
:mod:`runner.broker_server.schemas`, with its full metered budget: a schema against
the meta-schema (``{"kind": "schema", "name", "schema"}``), a submission's items
against ``inputSchema`` (``{"kind": "input", "schema", "items"}``) or a result against
``outputSchema`` (``{"kind": "result", "schema", "result"}``), each answered as
``{"problem": <text or null>}``. The limits and the job loop are
:mod:`runner.workers.child`'s; a MemoryError anywhere in a check is the limit's.

Runs as its own interpreter (started by :class:`runner.workers.pool.WorkerPool`, an
empty environment); no tenant code runs here, only jsonschema over a tenant's data.
Imports :mod:`runner.broker_server.schemas` and the worker loop; no asyncio.
"""

from __future__ import annotations

import sys
from typing import Any

from runner.broker_server.schemas import check_schema, validate_input, validate_result
from runner.workers import child


def answer(job: dict[str, Any], memory_bytes: int) -> dict[str, Any]:
    """The problem one job finds (None: none), as JSON-ready data."""
    match job["kind"]:
        case "schema":
            return {"problem": check_schema(job["schema"], str(job["name"]))}
        case "input":
            return {"problem": validate_input(job["schema"], job["items"])}
        case "result":
            return {"problem": validate_result(job["schema"], job["result"])}
    raise ValueError(f"unknown job kind {job['kind']!r}")


def main(argv: list[str]) -> None:
    """``MEMORY_BYTES CPU_S``: serve jobs on stdin, answers on stdout."""
    child.main(argv, answer)


if __name__ == "__main__":
    main(sys.argv[1:])
