"""Measurement for a proposal, not a way to run tasks: the same task through ``runc``
directly, with no daemon, under the very OCI spec Docker generates for our task
containers. Root only; not part of ``make bench`` (``python -m bench.runc_probe``).

How: a task container is started through DockerSandbox (full policy), its OCI
``config.json`` is copied while it runs, and the image is exported once into a
read-only root filesystem that every runc container shares (the root is read-only
and /tmp is a tmpfs, so no overlay layer per container is needed). The spec keeps
everything Docker put in (namespaces with a new network namespace, seccomp,
capabilities, no-new-privileges, rlimits, cgroup limits, masked and read-only
paths, the tmpfs, the user) except three things that belong to dockerd: its
libnetwork prestart hook, the bind mounts of /etc/hosts, /etc/hostname and
/etc/resolv.conf from dockerd's state directory, and the cgroup path.

Measured: ``runc run`` per task (cold), and a pre-started ``runc run`` waiting on
stdin for its task (warm), p50/p95 latency and sustained throughput at 1, 2 and 4,
host CPU per task. Results: ``bench/runc_results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import statistics
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from bench.memory import process_memory
from bench.run import host_cpu_s
from bench.stats import percentile
from runner.cli.wiring import docker_pipeline
from runner.sandbox.base import GuardConfig, Mode, TaskSpec
from runner.sandbox.envelope import decode_result, encode_task
from runner.settings import Settings

HERE = Path(__file__).resolve().parent
OCI_STATE = Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby")
DOCKERD_FILES = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
VALUES = list(range(1000))
CODE = "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]"


async def docker_spec(settings: Settings) -> tuple[dict[str, Any], Any, str]:
    """The OCI spec of one of our task containers, with the pipeline's guards and limits."""
    async with docker_pipeline(settings, lambda line: None) as pipeline:
        sandbox: Any = pipeline.sandbox
        await sandbox.warm_up(wait=True)
        (slot,) = sandbox.pool.idle_resources()
        spec = json.loads((OCI_STATE / slot.container_id / "config.json").read_text())
        return spec, pipeline, pipeline.context.image


def export_rootfs(image: str, into: Path) -> None:
    client = docker.from_env(timeout=120)
    container = client.containers.create(image)
    try:
        data = b"".join(container.export())
    finally:
        container.remove(force=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(into, filter="tar")


def runc_spec(spec: dict[str, Any], rootfs: Path) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    spec.pop("hooks", None)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in DOCKERD_FILES]
    spec["process"]["terminal"] = False
    return spec


class Runc:
    def __init__(self, spec: dict[str, Any], workdir: Path, envelope: bytes) -> None:
        self.spec = spec
        self.workdir = workdir
        self.envelope = envelope

    async def start(self) -> tuple[asyncio.subprocess.Process, str, Path]:
        """``runc run`` in the foreground: the container's stdio are runc's pipes."""
        name = f"bench-{uuid.uuid4().hex[:12]}"
        bundle = self.workdir / name
        bundle.mkdir()
        spec = dict(self.spec)
        spec["linux"] = {**spec["linux"], "cgroupsPath": f"/sandbox-bench/{name}"}
        (bundle / "config.json").write_text(json.dumps(spec))
        process = await asyncio.create_subprocess_exec(
            "runc",
            "run",
            "--bundle",
            str(bundle),
            name,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return process, name, bundle

    async def finish(self, started: tuple[asyncio.subprocess.Process, str, Path]) -> None:
        process, _, bundle = started
        stdout, stderr = await process.communicate(self.envelope)
        shutil.rmtree(bundle, ignore_errors=True)
        envelope = decode_result(stdout)
        if envelope.result != [{"json": {"sum": sum(VALUES)}}]:
            raise RuntimeError(f"runc: {envelope} {stderr[-500:]!r}")

    async def cold(self) -> None:
        await self.finish(await self.start())


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(runner_id="bench-runc", pool_size=1)
    spec, pipeline, image = await docker_spec(settings)
    guards: GuardConfig = pipeline.guards
    task = TaskSpec(
        task_id="runc",
        code=CODE,
        mode=Mode.ALL_ITEMS,
        items=[{"json": {"values": VALUES}}],
        guards=guards,
    )
    envelope = encode_task(task, pipeline.limits)
    workdir = Path(tempfile.mkdtemp(prefix="runc-bench-"))
    rootfs = workdir / "rootfs"
    rootfs.mkdir()
    try:
        export_rootfs(image, rootfs)
        runc = Runc(runc_spec(spec, rootfs), workdir, envelope)
        await runc.cold()
        cold, warm = [], []
        idle_memory: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            await runc.cold()
            cold.append((time.perf_counter() - began) * 1000)
            started = await runc.start()
            await asyncio.sleep(0.3)  # the agent is up and blocked on stdin
            if len(idle_memory) < 5:
                idle_memory.append(
                    {
                        "cgroup": container_cgroup_runc(started[1]),
                        "runc": process_memory(started[0].pid),
                    }
                )
            began = time.perf_counter()
            await runc.finish(started)
            warm.append((time.perf_counter() - began) * 1000)
        throughput: dict[str, Any] = {}
        for concurrency in args.concurrency:
            throughput[str(concurrency)] = await sustained(runc, concurrency, args)
        return {
            "latencyMs": {
                "runcCold": summarize(cold),
                "runcWarm": summarize(warm),
            },
            "throughput": throughput,
            "idleSlot": idle_memory,
            "note": "runc run in the foreground; the warm slot keeps its runc process",
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def container_cgroup_runc(name: str) -> dict[str, Any] | None:
    path = Path("/sys/fs/cgroup/memory/sandbox-bench") / name
    if not path.is_dir():
        return None
    usage = int((path / "memory.usage_in_bytes").read_text())
    return {"usage_kib": usage // 1024}


async def sustained(runc: Runc, concurrency: int, args: argparse.Namespace) -> dict[str, float]:
    window_start = time.monotonic() + args.warmup
    window_end = window_start + args.duration
    finished: list[float] = []
    cpu: list[float] = []

    async def worker() -> None:
        while time.monotonic() < window_end:
            await runc.cold()
            finished.append(time.monotonic())

    async def meter() -> None:
        for moment in (window_start, window_end):
            await asyncio.sleep(max(0.0, moment - time.monotonic()))
            cpu.append(host_cpu_s())

    await asyncio.gather(meter(), *(worker() for _ in range(concurrency)))
    counted = [t for t in finished if window_start <= t < window_end]
    return {
        "tasksPerS": round(len(counted) / args.duration, 2),
        "hostCpuMsPerTask": round((cpu[1] - cpu[0]) * 1000 / max(1, len(counted)), 1),
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="runc without a daemon (measurement only)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--concurrency", type=lambda raw: [int(p) for p in raw.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--out", type=Path, default=HERE / "runc_results.json")
    args = parser.parse_args()
    try:
        results = asyncio.run(measure(args))
    finally:
        for parent in Path("/sys/fs/cgroup").glob("*/sandbox-bench"):
            with contextlib.suppress(OSError):
                parent.rmdir()
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k != "idleSlot"}, indent=2))
    print(json.dumps(results["idleSlot"][:2], indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
