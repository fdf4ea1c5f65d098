"""``make bench``: the same small task several ways, latency, throughput and memory.

The task: sum 1,000 ints, JSON in and JSON out. The ways (:data:`WAYS`, one row each):

(a) ``forkserver`` -- our pipeline over :class:`~bench.forkserver.ForkserverSandbox`:
    one long-lived host process with the interpreter and the agent's modules loaded
    forks a child per task that runs the agent's own child code (what n8n does; no
    isolation between tasks). The base of every "/ (a)" ratio;
(a') ``spawn`` -- our pipeline over :class:`~runner.sandbox.process.ProcessSandbox`:
    the agent started as a fresh host process per task, so every task pays an
    interpreter start (what (a) was before; kept as an extra line, never a base);
(b) ``bare`` -- a bare docker SDK container per task (create/start/wait/logs/remove)
    with the same image, limits and security options (:mod:`bench.bare`);
(c) ``cold`` -- our pipeline over DockerSandbox, no pool: a fresh container per task;
(d) ``warm`` -- the same with the warm pool (a fresh, pre-started container per task);
(e) ``broker`` -- our service behind the embedded broker, as ``sandbox-runner up``
    runs them: submitted over HTTP (``POST /v1/tasks?wait=``), offered to the runner
    over the websocket protocol, run in a warm container (the same pool as (d)), the
    result sent back;
(f) ``ocicold`` -- our pipeline over the OCI backend (``runc`` driven directly, no
    dockerd, containerd or shim on the task's path), no pool;
(g) ``ociwarm`` -- the same with the warm pool;
(h) ``gvisor`` -- the OCI backend under gVisor (``runsc``), warm pool;
(i) ``ocibroker`` -- (e) over the pool of (g): ``up`` with this host's default
    backend, the way issue 12's targets are about.

Ways (f)-(i) need what the OCI backend needs (root, a runtime, writable cgroups);
where a way cannot run, the run says why and goes on without it.

Latency samples are interleaved (one sample of each way per round, the order
rotating), each taken with the system quiet: pool full, earlier removals done.
Throughput is sustained: C closed-loop workers per way, completions counted in a
window after a warm-up, so the pool's refill and the removals behind the tasks are
part of what is measured. Memory: see :mod:`bench.memory`. Results go to
``bench/results.json`` and a PNG chart; ``--help`` lists the knobs for longer runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import docker

from bench.bare import BENCH_OWNER, BareDocker
from bench.forkserver import ForkserverSandbox
from bench.memory import container_cgroup, daemon_memory, host_used_kib, outside_memory
from bench.stats import percentile
from runner.cli.wiring import docker_pipeline, task_pipeline
from runner.pipeline import TaskPipeline, TaskReport, TaskRequest
from runner.sandbox.labels import LABEL_OWNER
from runner.sandbox.oci import cgroups
from runner.sandbox.oci.runtime import find_runtime
from runner.sandbox.process import ProcessSandbox
from runner.settings import Settings

HERE = Path(__file__).resolve().parent
VALUES = list(range(1000))
EXPECTED_SUM = sum(VALUES)
CODE = "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]"


@dataclass(frozen=True, slots=True)
class Way:
    """One way to run the task: one line of the table, one key in results.json.

    Adding a way is a row here and, in :func:`main`, the pipeline that runs it (or a
    coroutine function, for a way that is not our pipeline).
    """

    key: str
    label: str  # "(x) what runs"; the chart shows the part after "(x) "
    isolation: str  # between tasks


ON_HOST, FRESH, PRESTARTED, GVISOR = (
    "none (a process on the host)",
    "fresh container",
    "fresh container (pre-started)",
    "fresh gVisor sandbox (pre-started)",
)
WAYS: tuple[Way, ...] = (
    Way("forkserver", "(a) forkserver on the host, a fork per task", ON_HOST),
    Way("spawn", "(a') agent spawned per task on the host (the old (a))", ON_HOST),
    Way("bare", "(b) bare docker SDK container", FRESH),
    Way("cold", "(c) our pipeline, cold container", FRESH),
    Way("warm", "(d) our pipeline, warm pool", PRESTARTED),
    Way("broker", "(e) `up` over HTTP, Docker warm pool", PRESTARTED),
    Way("ocicold", "(f) our pipeline, OCI runtime (runc) direct, cold", FRESH),
    Way("ociwarm", "(g) our pipeline, OCI runtime (runc) direct, warm pool", PRESTARTED),
    Way("gvisor", "(h) our pipeline, gVisor (runsc), warm pool", GVISOR),
    Way("ocibroker", "(i) `up` over HTTP, OCI warm pool (this host's default)", PRESTARTED),
)
WAY = {way.key: way for way in WAYS}
# The bases of the ratios: the strongest process baseline, and the plainest container.
FORKSERVER, BARE = "forkserver", "bare"
# The ways the embedded broker serves, by the warm pipeline it runs on.
BROKERS = {"warm": "broker", "ociwarm": "ocibroker"}
# Engines a pipeline can run on: (SANDBOX_BACKEND, SANDBOX_OCI_RUNTIME).
ENGINES = {"docker": ("docker", "runc"), "oci": ("oci", "runc"), "gvisor": ("oci", "runsc")}
# The ways of each engine whose task containers' cgroup peaks are read.
ENGINE_WAYS = {"docker": ("cold", "warm"), "oci": ("ocicold", "ociwarm"), "gvisor": ("gvisor",)}
MIB_KIB = 1024

One = Callable[[], Awaitable[TaskReport | None]]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "mean": round(statistics.fmean(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def other_containers(client: Any) -> int:
    """Running containers that are not this benchmark's: a sign the numbers are noisy.

    Docker's through the SDK, not the docker CLI: the CLI would be a child process, and
    the CPU of this process's reaped children is way (a')'s. The OCI backend's (and
    gVisor's) from their cgroups, by runner: every runner of this benchmark is named
    ``bench...``.
    """
    running = client.api.containers(filters={"status": "running"})
    # The bare SDK's (BENCH_OWNER) and every pipeline's (runner ids bench-...): ours. An
    # exact match missed the Docker warm pool's own slots and flagged every run noisy.
    docker_others = sum(
        1
        for c in running
        if not str((c.get("Labels") or {}).get(LABEL_OWNER, "")).startswith("bench")
        and (c.get("Labels") or {}).get(LABEL_OWNER) != BENCH_OWNER
    )
    oci_others = sum(
        1 for runner, _ in cgroups.every_container().values() if not runner.startswith("bench")
    )
    return docker_others + oci_others


def host_cpu_s() -> float:
    """CPU seconds the whole host has spent busy (all cores, every process and the kernel)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def stack_cpu_s(processes: dict[str, int] | None = None) -> dict[str, float]:
    """CPU seconds so far: the whole host, the two daemons, what PID 1 reaped, and us.

    containerd shims daemonize and end up children of PID 1; when one exits, its CPU
    and that of everything it reaped (runc, runc's hooks such as dockerd's
    libnetwork-setkey, the container's own processes) lands in PID 1's cutime. The
    agents way (a') spawns are this process's children: theirs lands in our cutime
    (``runnerChildren``). ``processes``: long-lived processes of a way, by name (the
    forkserver), each counted with the children it reaped (its tasks).
    """
    counters = {"host": host_cpu_s()}
    for name in ("dockerd", "containerd"):
        pids = [
            int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _comm(entry) == name
        ]
        counters[name] = sum(process_cpu_s(pid) for pid in pids)
    counters["shimsRuncContainers"] = process_cpu_s(1, reaped_children=True)
    runner = process_cpu_s(os.getpid())  # this process: the runner side
    counters["runner"] = runner
    counters["runnerChildren"] = process_cpu_s(os.getpid(), reaped_children=True) - runner
    for name, pid in (processes or {}).items():
        counters[name] = process_cpu_s(pid, reaped_children=True)
    return counters


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def host_facts(client: Any) -> dict[str, Any]:
    info = client.info()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": info.get("ServerVersion"),
        "runtime": info.get("DefaultRuntime"),
        "cgroup": info.get("CgroupVersion"),
        "memTotalMiB": int(Path("/proc/meminfo").read_text().split()[1]) // 1024,
        "ociRuntimes": oci_runtime_versions(),
    }


def oci_runtime_versions() -> dict[str, str]:
    """The version of each OCI runtime installed here (first line of ``--version``)."""
    versions = {}
    for name in ("runc", "crun", "runsc"):
        found = find_runtime(name)
        if found is None:
            continue
        try:
            answer = subprocess.run(
                [found[1], "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            continue
        words = (answer.stdout.splitlines() or [""])[0].split()
        versions[name] = words[-1] if words else "?"
    return versions


class Bench:
    """Runs the ways: interleaved latency rounds, then sustained throughput windows.

    ``pipelines``: the ways that are our pipeline over some sandbox. A sandbox with
    work behind its tasks (removals, a pool's refill) has ``wait_removals`` and
    ``warm_up``, and is brought to rest before every sample. ``brokers``: the ways
    through the embedded broker, each a coroutine function. ``cpu_processes``:
    long-lived processes of a way whose CPU is reported on its own (the forkserver).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        client: Any,
        pipelines: dict[str, TaskPipeline],
        bare: BareDocker,
        brokers: dict[str, Callable[[], Awaitable[None]]],
        cpu_processes: dict[str, int],
    ) -> None:
        self.args = args
        self.client = client
        self.pipelines = pipelines
        self.bare = bare
        self.brokers = brokers
        self.cpu_processes = cpu_processes
        self.runs = self._runs()
        self.way_names = [way.key for way in WAYS if way.key in self.runs]
        self.noise: list[int] = []
        self.cgroup_peaks: dict[str, list[int]] = {}
        self.phases: dict[str, list[dict[str, float]]] = {}

    def _runs(self) -> dict[str, One]:
        def pipeline_way(key: str, pipeline: TaskPipeline) -> One:
            return lambda: self._pipeline(pipeline, key)

        runs = {key: pipeline_way(key, pipeline) for key, pipeline in self.pipelines.items()}
        runs[BARE] = self._bare

        def broker_way(submit: Callable[[], Awaitable[None]]) -> One:
            async def via_broker() -> None:
                await submit()

            return via_broker

        runs |= {key: broker_way(submit) for key, submit in self.brokers.items()}
        return runs

    async def _pipeline(self, pipeline: TaskPipeline, way: str) -> TaskReport:
        report = await pipeline.run(TaskRequest(code=CODE, items=[{"json": {"values": VALUES}}]))
        if report.result != [{"json": {"sum": EXPECTED_SUM}}]:
            raise RuntimeError(f"{way}: wrong result {report.document()}")
        container_id = report.audit.get("containerId")
        if container_id:
            # Read at once, before the removal behind the task runs (the container is
            # still there: a successful result does not wait for its exit).
            cgroup = container_cgroup(container_id)
            if cgroup and cgroup.get("peak_kib"):
                self.cgroup_peaks.setdefault(way, []).append(cgroup["peak_kib"])
        return report

    async def _bare(self) -> None:
        result = await asyncio.to_thread(self.bare.run, VALUES)
        if result != {"sum": EXPECTED_SUM}:
            raise RuntimeError(f"bare: wrong result {result}")
        self.phases.setdefault(BARE, []).append(dict(self.bare.last_phases_ms))

    async def quiesce(self) -> None:
        """Nothing of ours in the background: removals done, pools full."""
        for pipeline in self.pipelines.values():
            sandbox: Any = pipeline.sandbox
            if hasattr(sandbox, "wait_removals"):
                await sandbox.wait_removals()
            if hasattr(sandbox, "warm_up"):
                await sandbox.warm_up(wait=True)

    # -- latency ---------------------------------------------------------------------

    async def latency(self) -> tuple[dict[str, Any], dict[str, Any]]:
        for one in self.runs.values():  # warm every path once (imports, caches, page cache)
            await self.quiesce()
            await one()
        self.phases.clear()
        names = self.way_names
        samples: dict[str, list[float]] = {way: [] for way in names}
        for round_number in range(self.args.rounds):
            shift = round_number % len(names)
            order = names[shift:] + names[:shift]
            self.noise.append(await asyncio.to_thread(other_containers, self.client))
            for way in order:
                await self.quiesce()
                began = time.perf_counter()
                report = await self.runs[way]()
                samples[way].append((time.perf_counter() - began) * 1000)
                if report is not None:
                    self.phases.setdefault(way, []).append(report.audit["durationsMs"])
        breakdown = {way: _median_phases(rows) for way, rows in self.phases.items()}
        return {way: summary(values) for way, values in samples.items()}, breakdown

    # -- throughput ------------------------------------------------------------------

    async def throughput(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
        names = self.way_names
        results: dict[str, dict[str, float]] = {way: {} for way in names}
        cpu: dict[str, dict[str, Any]] = {way: {} for way in names}
        for index, concurrency in enumerate(self.args.concurrency):
            shift = index % len(names)
            order = names[shift:] + names[:shift]
            for way in order:
                await self.quiesce()
                self.noise.append(await asyncio.to_thread(other_containers, self.client))
                rate, cpu_ms = await self._sustained(self.runs[way], concurrency)
                results[way][str(concurrency)] = round(rate, 2)
                cpu[way][str(concurrency)] = cpu_ms
                print(
                    f"  throughput {way:10s} c={concurrency}: {rate:6.2f} tasks/s, "
                    f"CPU ms/task {cpu_ms}",
                    flush=True,
                )
        return results, cpu

    async def _sustained(self, one: One, concurrency: int) -> tuple[float, dict[str, float] | None]:
        """Tasks per second in the window, and the CPU spent per task in it (ms)."""
        began = time.monotonic()
        window_start = began + self.args.warmup
        window_end = window_start + self.args.duration
        finished: list[float] = []
        cpu: list[dict[str, float]] = []

        async def worker() -> None:
            while time.monotonic() < window_end:
                await one()
                finished.append(time.monotonic())

        async def cpu_meter() -> None:
            for moment in (window_start, window_end):
                await asyncio.sleep(max(0.0, moment - time.monotonic()))
                cpu.append(stack_cpu_s(self.cpu_processes))

        await asyncio.gather(cpu_meter(), *(worker() for _ in range(concurrency)))
        counted = [t for t in finished if window_start <= t < window_end]
        if not counted:
            return 0.0, None
        cpu_ms = {
            name: round((cpu[1][name] - cpu[0][name]) * 1000 / len(counted), 1) for name in cpu[0]
        }
        return len(counted) / self.args.duration, cpu_ms


def _median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for row in rows for name in row})
    return {
        name: round(statistics.median(row[name] for row in rows if name in row), 2)
        for name in names
    }


async def probe(
    engine: str, pool_size: int, tasks: int
) -> tuple[Any, dict[str, Any], Callable[..., Any]]:
    """Start a runner probe process; return it, its first status, and a step function."""
    backend, runtime = ENGINES[engine]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.runner_probe",
        "--backend",
        backend,
        "--oci-runtime",
        runtime,
        "--pool-size",
        str(pool_size),
        "--tasks",
        str(tasks),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=HERE.parent,
    )
    assert process.stdout is not None
    assert process.stdin is not None

    async def read_status() -> dict[str, Any]:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 300)
        if not line:
            raise RuntimeError("runner probe ended early")
        status: dict[str, Any] = json.loads(line)
        return status

    async def step(command: str) -> dict[str, Any] | None:
        assert process.stdin is not None
        process.stdin.write(f"{command}\n".encode())
        await process.stdin.drain()
        if command == "exit":
            await process.wait()
            return None
        return await read_status()

    return process, await read_status(), step


async def measure_memory(bench: Bench, args: argparse.Namespace, engine: str) -> dict[str, Any]:
    """Idle slot, task container, runner on ``engine``: see bench/README.md for what is
    counted. The daemons' growth counts on Docker only (no other engine uses them)."""
    slots_n = args.memory_slots
    # The runner alone, no pool, after some tasks (baseline for the per-slot runner cost).
    _, runner0, step0 = await probe(engine, 0, args.probe_tasks)
    await step0("close")
    await step0("exit")
    # A runner with the default pool (the runner memory we report).
    _, runner_default, step_d = await probe(engine, args.pool_size, args.probe_tasks)
    await step_d("close")
    await step_d("exit")
    # A runner holding slots_n idle slots: measure them, then close the pool and diff.
    daemons_before = daemon_memory()
    _, held, step_m = await probe(engine, slots_n, args.probe_tasks)
    await asyncio.sleep(args.settle)  # let the slots' page faults and the daemons settle
    daemons_held = daemon_memory()
    host_held = host_used_kib()
    slots = []
    for container_id in held["slots"]:
        slots.append(
            {"cgroup": container_cgroup(container_id), "shim": outside_memory(container_id)}
        )
    await step_m("close")
    await asyncio.sleep(args.settle)
    daemons_after = daemon_memory()
    host_after = host_used_kib()
    await step_m("exit")

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 1) if values else float("nan")

    cgroup_kib = median([s["cgroup"]["usage_kib"] for s in slots if s["cgroup"]])
    shim_pss = median([s["shim"]["pss_kib"] for s in slots if s["shim"]])
    shim_rss = median([s["shim"]["rss_kib"] for s in slots if s["shim"]])
    # Go daemons keep freed memory a while, so the drop after closing the pool may
    # show nothing; the growth since before the probe includes its tasks' churn.
    # The larger of the two is taken: an upper bound.
    daemon_delta = 0.0
    for name in ("dockerd", "containerd") if engine == "docker" else ():
        held_rss = (daemons_held.get(name) or {}).get("rss_kib")
        if held_rss is None:
            continue
        deltas = [
            (held_rss - other["rss_kib"]) / slots_n
            for other in (daemons_before.get(name), daemons_after.get(name))
            if other
        ]
        daemon_delta += max([0.0, *deltas])
    runner_delta = max(0.0, (held["rss_kib"] - runner0["rss_kib"]) / slots_n)
    counted = cgroup_kib + shim_pss + daemon_delta + runner_delta
    upper = cgroup_kib + shim_rss + daemon_delta + runner_delta
    task_peaks = [peak for way in ENGINE_WAYS[engine] for peak in bench.cgroup_peaks.get(way, [])]
    return {
        "idleSlot": {
            "slots": slots_n,
            "cgroupUsageKiB": cgroup_kib,
            "cgroupAnonKiB": median([s["cgroup"]["anon_kib"] for s in slots if s["cgroup"]]),
            "cgroupKernelKiB": median(
                [s["cgroup"]["kernel_kib"] or 0 for s in slots if s["cgroup"]]
            ),
            "shimPssKiB": shim_pss,
            "shimRssKiB": shim_rss,
            "daemonsPerSlotKiB": round(daemon_delta, 1),
            "runnerPerSlotKiB": round(runner_delta, 1),
            "countedMiB": round(counted / MIB_KIB, 2),
            "countedWithShimRssMiB": round(upper / MIB_KIB, 2),
            "hostUsedDeltaPerSlotMiB": round((host_held - host_after) / slots_n / MIB_KIB, 2),
            "perSlot": slots,
        },
        "taskContainer": {
            "cgroupPeakKiB": median([float(v) for v in task_peaks]),
            "withShimPssMiB": round((median([float(v) for v in task_peaks]) + shim_pss) / 1024, 2)
            if task_peaks
            else None,
            "samples": len(task_peaks),
        },
        "runner": {
            "poolSize": args.pool_size,
            "rssMiB": round(runner_default["rss_kib"] / 1024, 1),
            "pssMiB": round(runner_default["pss_kib"] / 1024, 1),
            "peakRssMiB": round(runner_default["peak_rss_kib"] / 1024, 1),
            "withoutPoolRssMiB": round(runner0["rss_kib"] / 1024, 1),
        },
    }


def _target(
    issue: int, target: str, value: float | None, limit: float, unit: str, *, at_most: bool
) -> dict[str, Any]:
    met = value is not None and (value <= limit if at_most else value >= limit)
    return {
        "issue": issue,
        "target": target,
        "value": value,
        "limit": limit,
        "unit": unit,
        "met": met,
    }


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    latency, throughput = results["latencyMs"], results["throughputPerS"]
    cpu, memory = results.get("cpuMsPerTask", {}), results.get("memory", {})
    ways = [way.key for way in WAYS if way.key in latency]
    p50 = {way: latency[way]["p50"] for way in ways}
    ratios: dict[str, Any] = {
        "latencyP50VsForkserver": {way: round(p50[way] / p50[FORKSERVER], 2) for way in ways},
        "latencyP50VsBare": {way: round(p50[way] / p50[BARE], 2) for way in ways},
        "throughputVsForkserver": {},
        "throughputVsBare": {},
    }
    for concurrency in throughput[BARE]:
        for base, key in ((FORKSERVER, "throughputVsForkserver"), (BARE, "throughputVsBare")):
            ratios[key][concurrency] = {
                way: round(throughput[way][concurrency] / throughput[base][concurrency], 2)
                for way in ways
                if throughput[base][concurrency]
            }
    top = str(max(int(c) for c in throughput[BARE]))
    vs_fork, vs_bare = ratios["latencyP50VsForkserver"], ratios["throughputVsBare"].get(top, {})
    targets = [
        # Issue 6, on Docker: (d) against (a), (c) against (b).
        _target(
            6,
            "warm-pool p50 latency (d) <= 1.3 x (a) forkserver's",
            vs_fork["warm"],
            1.3,
            "x",
            at_most=True,
        ),
        _target(
            6,
            "cold p50 latency (c) <= 1.0 x bare docker SDK's",
            ratios["latencyP50VsBare"]["cold"],
            1.0,
            "x",
            at_most=True,
        ),
        _target(
            6,
            f"warm-pool throughput (d) at concurrency {top} >= 2 x bare docker SDK's",
            vs_bare.get("warm"),
            2.0,
            "x",
            at_most=False,
        ),
    ]
    if "docker" in memory:
        targets.append(
            _target(
                6,
                "idle pool slot on Docker <= 20 MiB of host memory, everything counted",
                memory["docker"]["idleSlot"]["countedMiB"],
                20.0,
                "MiB",
                at_most=True,
            )
        )
    # Issue 12: `up` over HTTP with this host's default backend ((i), or (e) where the
    # OCI backend cannot run), against the forkserver and the bare SDK.
    up = "ocibroker" if "ocibroker" in latency else "broker"
    if up in latency:
        letter = WAY[up].label.split(" ", 1)[0]
        up_cpu = (cpu.get(up, {}).get(top) or {}).get("host")
        targets += [
            _target(
                12,
                f"warm p50 through `up`'s HTTP API {letter} <= 1.2 x (a) forkserver's",
                vs_fork[up],
                1.2,
                "x",
                at_most=True,
            ),
            _target(
                12,
                f"throughput of `up` {letter} at concurrency {top} >= 2.5 x bare docker SDK's",
                vs_bare.get(up),
                2.5,
                "x",
                at_most=False,
            ),
            _target(
                12,
                f"host CPU per task of `up` {letter} at concurrency {top} <= 70 ms, all processes",
                up_cpu,
                70.0,
                "ms",
                at_most=True,
            ),
        ]
    if "oci" in memory:
        targets.append(
            _target(
                12,
                "idle pool slot on the OCI backend <= 12 MiB, everything counted",
                memory["oci"]["idleSlot"]["countedMiB"],
                12.0,
                "MiB",
                at_most=True,
            )
        )
    broker = results.get("broker")
    if broker:
        targets.append(
            _target(
                13,
                "broker dispatch on the SQLite store (the core, a fake runner) >= 500 tasks/s",
                broker["sqlite"]["tasksPerS"],
                500.0,
                "tasks/s",
                at_most=False,
            )
        )
        if "redis" in broker:
            targets.append(
                _target(
                    13,
                    "broker dispatch on the Redis store (the core, a fake runner) >= 1,000 tasks/s",
                    broker["redis"]["tasksPerS"],
                    1000.0,
                    "tasks/s",
                    at_most=False,
                )
            )
    return {"ratios": ratios, "targets": targets}


README = HERE.parent / "README.md"
README_START = "<!-- bench:start (generated by `make bench` from bench/results.json) -->"
README_END = "<!-- bench:end -->"


def markdown(results: dict[str, Any]) -> str:
    """The README's benchmark block: the latest run, its ratios, and the targets."""
    latency, throughput = results["latencyMs"], results["throughputPerS"]
    ratios, meta, cpu = results["ratios"], results["meta"], results.get("cpuMsPerTask", {})
    levels = list(throughput[BARE])
    top = levels[-1]
    host = meta["host"]
    runtimes = ", ".join(
        f"{name} {version}" for name, version in host.get("ociRuntimes", {}).items()
    )
    lines = [
        f"Latest run: {meta['finishedAt'][:10]}, {host['cpus']} cores, Docker {host['docker']} "
        f"({host['runtime']}, cgroup v{host['cgroup']}), kernel {host['kernel']}"
        + (f"; OCI runtimes {runtimes}" if runtimes else "")
        + f"; {latency['warm']['n']} interleaved latency samples per way, throughput over "
        f"{meta['durationS']:.0f} s windows; pool size {meta['poolSize']}, refill "
        f"concurrency {meta['refillConcurrency']}."
        + (
            f" **Noisy**: {meta['otherContainersSeen']} other container(s) ran meanwhile."
            if meta["otherContainersSeen"]
            else " No other containers ran meanwhile."
        ),
        "",
        "| way | isolation between tasks | p50 ms | p95 ms | p50 / (a) | p50 / (b) | "
        + " | ".join(f"tasks/s at {c}" for c in levels)
        + f" | at {top} / (a) | at {top} / (b) | host CPU ms per task at {top} |",
        "| --- | --- | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in levels)
        + " | ---: | ---: | ---: |",
    ]
    for way in (way.key for way in WAYS if way.key in latency):
        host_cpu = (cpu.get(way, {}).get(top) or {}).get("host")
        lines.append(
            f"| {WAY[way].label} | {WAY[way].isolation} | {latency[way]['p50']:.0f} | "
            f"{latency[way]['p95']:.0f} | {ratios['latencyP50VsForkserver'][way]:.2f} | "
            f"{ratios['latencyP50VsBare'][way]:.2f} | "
            + " | ".join(f"{throughput[way][c]:.1f}" for c in levels)
            + f" | {ratios['throughputVsForkserver'][top][way]:.2f} | "
            f"{ratios['throughputVsBare'][top][way]:.2f} | "
            + (f"{host_cpu:.0f}" if host_cpu is not None else "-")
            + " |"
        )
    if meta.get("notMeasured"):
        lines += [
            "",
            "Left out: "
            + "; ".join(
                f"{WAY[key].label if key in WAY else key}: {why}"
                for key, why in meta["notMeasured"].items()
            )
            + ".",
        ]
    lines += ["", "| issue | target | measured | met? |", "| ---: | --- | ---: | --- |"]
    for target in results["targets"]:
        verdict = "**met**" if target["met"] else "**not met**"
        unit = {"x": " x", "MiB": " MiB", "ms": " ms", "tasks/s": " tasks/s"}[target["unit"]]
        lines.append(
            f"| {target['issue']} | {target['target']} | {target['value']}{unit} | {verdict} |"
        )
    for engine, memory in results.get("memory", {}).items():
        lines += ["", _memory_line(engine, memory)]
    if results.get("packages"):
        lines += ["", _packages_line(results["packages"])]
    if results.get("broker"):
        lines += ["", _broker_line(results["broker"])]
    if results.get("neighbour"):
        from bench import neighbour

        lines += neighbour.markdown(results["neighbour"])
    return "\n".join(lines)


def _broker_line(broker: dict[str, Any]) -> str:
    """The broker's dispatch (issue 13): the core alone, per task store."""
    memory, sqlite = broker["memory"], broker["sqlite"]
    redis = broker.get("redis")
    shared = (
        f", Redis on loopback {redis['tasksPerS']:,.0f} tasks/s (p50 {redis['p50Ms']:.2f} ms: "
        "four Lua steps per task: add, claim, running lease, result)"
        if redis
        else ""
    )
    return (
        f"Broker dispatch (the core with a fake runner that answers at once, one task at a "
        f"time, {broker['tasks']} tasks): memory store {memory['tasksPerS']:,.0f} tasks/s "
        f"(p50 {memory['p50Ms']:.2f} ms per task), SQLite as shipped "
        f"{sqlite['tasksPerS']:,.0f} tasks/s (p50 {sqlite['p50Ms']:.2f} ms: two fsyncs per "
        f"task){shared}; issue 13's targets are >= 500 tasks/s on SQLite and >= 1,000 on "
        "Redis."
    )


def _packages_line(packages: dict[str, Any]) -> str:
    """The pandas task's line (issue 14): cold, warm, warm with the slot's preload."""
    slot = packages["idleSlotCgroupMb"]
    return (
        f"A pandas task (a DataFrame group-by; the packages image, "
        f"{ENGINE_NAMES[packages['engine']]}), p50 / p95 ms: cold "
        f"{packages['coldMs']['p50']:.0f} / {packages['coldMs']['p95']:.0f}, warm "
        f"{packages['warmMs']['p50']:.0f} / {packages['warmMs']['p95']:.0f}, warm with "
        f'`[image] preload = ["pandas"]` {packages["warmPreloadMs"]["p50"]:.0f} / '
        f"{packages['warmPreloadMs']['p95']:.0f}; the preload costs an idle slot "
        f"{slot['preload'] - slot['noPreload']:.0f} MB of memory ({slot['noPreload']:.0f} -> "
        f"{slot['preload']:.0f} MB) and {packages['preloadMs']:.0f} ms of its agent's time "
        f"before it waits ({packages['runs']} tasks per series)."
    )


ENGINE_NAMES = {
    "docker": "Docker",
    "oci": "the OCI backend (runc direct)",
    "gvisor": "gVisor (runsc)",
}


def _memory_line(engine: str, memory: dict[str, Any]) -> str:
    slot, task, runner = memory["idleSlot"], memory["taskContainer"], memory["runner"]
    outside = (
        "its containerd shim's PSS"
        if engine == "docker"
        else "the PSS of its processes outside the cgroup"
    )
    daemons = "daemons and runner" if engine == "docker" else "runner"
    return (
        f"Memory on {ENGINE_NAMES[engine]}: an idle pool slot costs **{slot['countedMiB']} MiB** "
        f"counted as bench/README.md says (its cgroup {slot['cgroupUsageKiB'] / 1024:.1f} MiB "
        f"+ {outside} {slot['shimPssKiB'] / 1024:.1f} MiB + {daemons} "
        f"{(slot['daemonsPerSlotKiB'] + slot['runnerPerSlotKiB']) / 1024:.1f} MiB); the "
        f"host's own used-memory delta says {slot['hostUsedDeltaPerSlotMiB']} MiB per slot, "
        f"and with full RSS instead of PSS it would be {slot['countedWithShimRssMiB']} MiB. "
        f"A task container peaks at {(task['cgroupPeakKiB'] or 0) / 1024:.1f} MiB in its "
        f"cgroup. The runner process (pool of {runner['poolSize']}) holds "
        f"{runner['rssMiB']} MiB RSS."
    )


def update_readme(results: dict[str, Any]) -> bool:
    text = README.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    README.write_text(
        f"{head}{README_START}\n{markdown(results)}\n{README_END}{tail}", encoding="utf-8"
    )
    return True


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    latency, throughput = results["latencyMs"], results["throughputPerS"]
    ways = [way.key for way in WAYS if way.key in latency]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6))
    positions = range(len(ways))
    left.bar([p - 0.2 for p in positions], [latency[w]["p50"] for w in ways], 0.4, label="p50")
    left.bar([p + 0.2 for p in positions], [latency[w]["p95"] for w in ways], 0.4, label="p95")
    left.set_xticks(list(positions), [WAY[w].label.split(") ", 1)[1] for w in ways], rotation=20)
    left.set_ylabel("latency, ms (log)")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.yaxis.set_minor_formatter(NullFormatter())
    for bars in left.containers:
        left.bar_label(bars, fmt="%.0f", fontsize=8)
    left.set_title("Latency of one small task, quiet system")
    left.legend()
    levels = list(throughput[BARE])
    width = 0.8 / len(ways)
    for index, way in enumerate(ways):
        xs = [i + (index - (len(ways) - 1) / 2) * width for i in range(len(levels))]
        right.bar(xs, [throughput[way][c] for c in levels], width, label=WAY[way].label)
    right.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
    right.set_ylabel("tasks per second")
    for bars in right.containers:
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_title("Sustained throughput (pool refill and removals included)")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    meta = results["meta"]
    figure.suptitle(
        f"sandbox-runner bench {meta['finishedAt'][:16]} - {meta['host']['cpus']} cores, "
        f"Docker {meta['host']['docker']} ({meta['host']['runtime']}), "
        f"pool {meta['poolSize']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextlib.asynccontextmanager
async def embedded_broker(
    settings: Settings, pipeline: TaskPipeline
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """The embedded broker and one runner service in this process, as `sandbox-runner up`
    runs them; yields a coroutine function that submits the task over HTTP and waits."""
    import httpx

    from runner.broker_server.server import running_broker
    from runner.service import RunnerService

    # The store in memory, as this bench always measured: the runner's path, not the
    # default SQLite store's two fsyncs per task (their cost: python -m bench.broker_store),
    # and nothing written to the machine's state directory.
    broker_settings = Settings(
        **{**settings.model_dump(), "broker_port": 0, "broker_store": "memory"}
    )
    async with running_broker(broker_settings) as running:
        service = RunnerService(
            broker_settings,
            pipeline,
            broker_uri=running.url,
            auth_token=running.auth_token,
            handle_signals=False,
        )
        serving = asyncio.create_task(service.run())
        body = {"code": CODE, "items": [{"json": {"values": VALUES}}]}
        async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:

            async def submit() -> None:
                response = await client.post("/v1/tasks", params={"wait": 60}, json=body)
                document = response.json()
                if response.status_code != 200 or document.get("result") != [
                    {"json": {"sum": EXPECTED_SUM}}
                ]:
                    raise RuntimeError(f"broker: {response.status_code} {document}")

            try:
                async with asyncio.timeout(60):  # the runner registers, then offers
                    while True:
                        try:
                            await submit()
                            break
                        except RuntimeError:
                            await asyncio.sleep(0.2)
                yield submit
            finally:
                service.request_shutdown("benchmark done")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(serving, 30)


def _same_pipeline(like: TaskPipeline, sandbox: Any) -> TaskPipeline:
    """Our pipeline over another sandbox: the same analyzer, guards, limits and audit."""
    return TaskPipeline(
        sandbox=sandbox,
        analyzer=like.analyzer,
        guards=like.guards,
        limits=like.limits,
        context=like.context,
    )


def engine_settings(engine: str, args: argparse.Namespace, *, warm: bool) -> Settings:
    """A pipeline's settings on ``engine`` (:data:`ENGINES`): its own runner id, so no
    pipeline's start-up sweep takes another's containers for leftovers."""
    backend, runtime = ENGINES[engine]
    return Settings(
        runner_id=f"bench-{engine}-{'warm' if warm else 'cold'}",
        backend=backend,
        oci_runtime=runtime,
        pool_size=args.pool_size if warm else 0,
        pool_refill_concurrency=args.refill,
    )


async def optional_pipeline(
    stack: contextlib.AsyncExitStack, engine: str, args: argparse.Namespace, *, warm: bool
) -> TaskPipeline | str:
    """The pipeline on ``engine``, or why it cannot run here (the way is then left out)."""
    try:
        return await stack.enter_async_context(
            task_pipeline(
                engine_settings(engine, args, warm=warm),
                lambda line: None,
                warm_pool=warm,
                backend=ENGINES[engine][0],
            )
        )
    except Exception as exc:  # a benchmark reports what it could not measure, and goes on
        return f"{type(exc).__name__}: {exc}"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=32, thread_name_prefix="bench")
    )
    started = datetime.now(UTC)
    quiet = lambda line: None  # noqa: E731 - image build progress is not interesting here
    cold_settings = engine_settings("docker", args, warm=False)
    warm_settings = engine_settings("docker", args, warm=True)
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    async with (
        docker_pipeline(cold_settings, quiet, warm_pool=False) as cold,
        docker_pipeline(warm_settings, quiet) as warm,
        contextlib.AsyncExitStack() as stack,
    ):
        pipelines: dict[str, TaskPipeline] = {"cold": cold, "warm": warm}
        for key, engine, is_warm in (
            ("ocicold", "oci", False),
            ("ociwarm", "oci", True),
            ("gvisor", "gvisor", True),
        ):
            if engine not in args.engines:
                notes[key] = "skipped (--engines)"
                continue
            made = await optional_pipeline(stack, engine, args, warm=is_warm)
            if isinstance(made, str):
                notes[key] = f"not measured: {made}"
                print(f"  {WAY[key].label}: {notes[key]}", flush=True)
            else:
                pipelines[key] = made
        brokers: dict[str, Callable[[], Awaitable[None]]] = {}
        for pipeline_key, key in BROKERS.items():
            if args.no_broker or pipeline_key not in pipelines:
                notes[key] = "skipped (--no-broker)" if args.no_broker else "its pool is not here"
                continue
            try:
                brokers[key] = await stack.enter_async_context(
                    embedded_broker(warm_settings, pipelines[pipeline_key])
                )
            except Exception as exc:  # the broker is another team's moving target
                notes[key] = f"not measured: {type(exc).__name__}: {exc}"
                print(f"  {WAY[key].label}: {notes[key]}", flush=True)
        # Way (a): started once for the whole run, like a runner's forkserver.
        forkserver = await ForkserverSandbox.start(args.image_dir)
        stack.push_async_callback(forkserver.aclose)
        sandboxes: dict[str, Any] = {FORKSERVER: forkserver}
        if not args.no_spawn:
            spawn = ProcessSandbox(args.image_dir)
            stack.push_async_callback(spawn.aclose)
            sandboxes["spawn"] = spawn
        pipelines |= {key: _same_pipeline(cold, sandbox) for key, sandbox in sandboxes.items()}
        client = docker.from_env(timeout=120)
        docker_sandbox: Any = cold.sandbox  # a DockerSandbox: its isolation is (b)'s too
        bare = BareDocker(client, cold.context.image, docker_sandbox.isolation, cold.limits)
        bench = Bench(args, client, pipelines, bare, brokers, {FORKSERVER: forkserver.pid})
        print(f"latency: {args.rounds} interleaved rounds ...", flush=True)
        latency, phases = await bench.latency()
        for way, numbers in latency.items():
            print(f"  {WAY[way].label:60s} {numbers}", flush=True)
        print(f"throughput: concurrency {args.concurrency} ...", flush=True)
        throughput, cpu_per_task = await bench.throughput()
        await bench.quiesce()
        results["latencyMs"] = latency
        results["phasesMs"] = phases
        results["throughputPerS"] = throughput
        results["cpuMsPerTask"] = cpu_per_task
        results["pool"] = {}
        for key in ("warm", "ociwarm", "gvisor"):
            if key in pipelines:
                stats = cast(Any, pipelines[key].sandbox).pool.stats()
                results["pool"][key] = {
                    "created": stats.created,
                    "taken": stats.taken,
                    "expired": stats.expired,
                    "discarded": stats.discarded,
                    "failures": stats.failures,
                }
    if not args.skip_memory:
        results["memory"] = {}
        for engine in ("docker", *(e for e in args.engines if e != "docker")):
            if engine != "docker" and not any(way in pipelines for way in ENGINE_WAYS[engine]):
                continue  # the engine cannot run here: said above
            print(f"memory on {engine} ...", flush=True)
            try:
                results["memory"][engine] = await measure_memory(bench, args, engine)
            except Exception as exc:  # reported, the rest of the run goes on
                notes[f"memory {engine}"] = f"not measured: {type(exc).__name__}: {exc}"
                print(f"  memory on {engine}: {notes[f'memory {engine}']}", flush=True)
    if not args.no_neighbour:
        from bench import neighbour

        print("noisy neighbour: tenant B alone, then under tenant A's attacks ...", flush=True)
        results["neighbour"] = await neighbour.measure(args.rounds)
    if not args.no_packages:
        from bench import packages

        # The default engine's pool: OCI where it runs here, else Docker.
        engine = "oci" if "ociwarm" in pipelines else "docker"
        print(f"pandas task on {engine}: cold, warm, warm with preload ...", flush=True)
        try:
            results["packages"] = await packages.measure(engine)
        except Exception as exc:  # reported, the rest of the run goes on
            notes["packages"] = f"not measured: {type(exc).__name__}: {exc}"
            print(f"  pandas task: {notes['packages']}", flush=True)
    if not args.no_dispatch:
        from bench import broker_store

        print(
            "broker dispatch: the core with a fake runner, memory, SQLite and Redis ...",
            flush=True,
        )
        results["broker"] = await asyncio.to_thread(broker_store.dispatch)
    results["meta"] = {
        "startedAt": started.isoformat(timespec="seconds"),
        "finishedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host_facts(bench.client),
        "task": "sum of 1,000 ints, JSON in and out",
        "rounds": args.rounds,
        "warmupS": args.warmup,
        "durationS": args.duration,
        "poolSize": args.pool_size,
        "refillConcurrency": args.refill,
        "otherContainersSeen": max(bench.noise, default=0),
        "notMeasured": notes,
        "forkserver": "(a): one host process, started once, the agent's modules loaded, "
        "forks a child per task running the agent's child code (bench/forkserver/)",
    }
    results.update(evaluate(results))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds (default 30)")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="throughput window per run, s (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="throughput warm-up per run, s (default 1)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda raw: [int(part) for part in raw.split(",")],
        default=[1, 2, 4],
        help="comma list (default 1,2,4)",
    )
    parser.add_argument("--pool-size", type=int, default=2, help="warm pool size (default 2)")
    parser.add_argument("--refill", type=int, default=2, help="refill concurrency (default 2)")
    parser.add_argument(
        "--memory-slots", type=int, default=6, help="idle slots held for memory (default 6)"
    )
    parser.add_argument("--probe-tasks", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true", help="no memory measurements")
    parser.add_argument(
        "--no-broker", action="store_true", help="skip ways (e) and (i), through the broker"
    )
    parser.add_argument(
        "--engines",
        type=lambda raw: [part for part in raw.split(",") if part],
        default=["oci", "gvisor"],
        help="engines besides Docker: comma list of oci,gvisor (default both; Docker's "
        "ways (b)-(e) always run, they are the bases)",
    )
    parser.add_argument(
        "--no-spawn", action="store_true", help="skip way (a'), the agent spawned per task"
    )
    parser.add_argument(
        "--no-neighbour", action="store_true", help="skip tenant B's latency under A's attacks"
    )
    parser.add_argument(
        "--no-packages",
        action="store_true",
        help="skip the pandas task (cold, warm, warm with [image] preload; ~20 s, and the "
        "packages image is built first if missing)",
    )
    parser.add_argument(
        "--no-dispatch",
        action="store_true",
        help="skip the broker's dispatch rate per task store (the core with a fake runner)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--chart", type=Path, default=HERE / "results.png")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--no-readme", action="store_true", help="leave README.md's benchmark table alone"
    )
    parser.add_argument(
        "--image-dir", type=Path, default=Settings().image_dir, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(main(args))
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if not args.no_chart:
        chart(results, args.chart)
        print(f"wrote {args.chart}")
    if not args.no_readme and update_readme(results):
        print(f"updated the benchmark table in {README}")
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        print(f"  {target['target']}: {target['value']} ({verdict})")
    if results["meta"]["otherContainersSeen"]:
        print(
            f"warning: {results['meta']['otherContainersSeen']} other container(s) ran during "
            "the benchmark; the numbers are noisy, re-run on a quiet machine"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        run()
