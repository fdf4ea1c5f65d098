"""A runner process on its own, for memory measurements (started by ``bench/run.py``).

``python -m bench.runner_probe --backend B --oci-runtime R --pool-size N --tasks K``:
builds the pipeline on backend B (``docker`` or ``oci``; R the OCI runtime) with a
pool of N, runs K tasks, waits until the pool is full again and every
removal is done, then prints one JSON status line (its own memory and the ids of
the idle pool containers) and waits for a line on stdin. ``close`` closes the
pipeline (the pool's containers are removed) and prints a second status; ``exit``
(or EOF) ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from bench.memory import process_memory
from runner.cli.wiring import task_pipeline
from runner.pipeline import TaskRequest
from runner.settings import Settings

VALUES = list(range(1000))
CODE = "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]"


def status(state: str, slots: list[str]) -> None:
    memory = process_memory(os.getpid()) or {}
    print(json.dumps({"state": state, "slots": slots, **memory}), flush=True)


async def main(backend: str, runtime: str, pool_size: int, tasks: int) -> None:
    settings = Settings(
        runner_id=f"bench-probe-{os.getpid()}",
        backend=backend,
        oci_runtime=runtime,
        pool_size=pool_size,
    )
    readline = sys.stdin.readline
    async with task_pipeline(settings, lambda line: None, backend=backend) as pipeline:
        sandbox: Any = pipeline.sandbox
        for _ in range(tasks):
            await sandbox.warm_up(wait=True)
            report = await pipeline.run(
                TaskRequest(code=CODE, items=[{"json": {"values": VALUES}}])
            )
            assert report.is_success, report.document()
        await sandbox.warm_up(wait=True)
        await sandbox.wait_removals()
        slots = [c.container_id for c in sandbox.pool.idle_resources()] if sandbox.pool else []
        status("ready", slots)
        command = (await asyncio.to_thread(readline)).strip()
    if command == "close":
        status("closed", [])
        await asyncio.to_thread(readline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("docker", "oci"), default="docker")
    parser.add_argument("--oci-runtime", default="runc")
    parser.add_argument("--pool-size", type=int, required=True)
    parser.add_argument("--tasks", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.backend, args.oci_runtime, args.pool_size, args.tasks))
