"""What numpy and pandas in the task image cost (issue 14). ``make bench`` runs the pandas
task's series of it (:func:`measure`: cold, warm, warm with preload); the rest is here.

``python -m bench.packages [--runs N] [--engine docker|oci] [--rebuild]``: the default
task image and the image of the tests' packages bundle (the default bundle with
``python_packages = ["numpy==2.*", "pandas"]`` and ``tests/fixtures/python-packages.lock``),
side by side:

- the size of each image (Docker's ``Size``);
- with ``--rebuild``, the packages image removed and built again with the wheel cache
  warm (what ``make image`` costs after the lock changed, the wheels being cached);
- the latency of one task through our pipeline, cold (no pool: what ``exec`` pays per
  task) and warm (a pool of one slot, refilled before each task), for a stdlib task
  (sum 1,000 ints) and a pandas task (a DataFrame group-by) in the packages image;
- the same two tasks warm with ``[image] preload = ["pandas"]`` (the slot's agent
  imported pandas before its task; each task waits until the slot's agent has
  settled, as a slot refilled in the background has), and what the preload costs a
  slot: the agent's own time for the imports (``agentPreloadMs``), and an idle slot's
  memory with and without it (its cgroup's ``memory.current`` and the agent's
  ``RssAnon``, its private memory; file pages are shared through the page cache).

Nothing asserts on time; the figures go to bench/README.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from bench.stats import percentile
from runner.cli.wiring import (
    image_recipe,
    make_docker_sandbox,
    make_oci_sandbox,
    make_pipeline,
    oci_runtime,
)
from runner.pipeline import TaskRequest
from runner.sandbox.image import ImageBuilder
from runner.settings import PROJECT_ROOT, Settings

sys.path.insert(0, str(PROJECT_ROOT / "tests"))
from helpers import PANDAS_EXTERNAL_ALLOW, packages_bundle, preload_bundle

STDLIB_TASK = "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]"
PANDAS_TASK = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'k': ['a', 'b', 'a'], 'n': [1, 2, 3]})\n"
    "return [{'json': df.groupby('k')['n'].sum().to_dict()}]"
)
ITEMS = [{"json": {"values": list(range(1000))}}]


def _agent_pid(pid1: int) -> int:
    """The agent: tini's (the container's PID 1) only child."""
    children = Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
    return int(children[0])


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def _cgroup_memory(pid: int) -> int:
    """The memory charged to the process's memory cgroup (v1 on a hybrid host, else v2)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            return int(file.read_text())
    path = next(line.split("::", 1)[1] for line in lines if line.startswith("0::"))
    return int((Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current").read_text())


def _slot_pid1(sandbox: Any, client: docker.DockerClient) -> int:
    assert sandbox.pool is not None
    (slot,) = sandbox.pool.idle_resources()
    pid = getattr(slot, "pid", 0)
    if not pid:  # Docker's: the host PID of its PID 1
        pid = int(client.api.inspect_container(slot.container_id)["State"]["Pid"])
    return pid


async def settled_slot(sandbox: Any, client: docker.DockerClient) -> dict[str, float]:
    """Wait until the idle slot's agent stops growing (its preload done, blocked on its
    stdin); then its memory: the cgroup's and the agent's private (anonymous) RSS."""
    agent = _agent_pid(_slot_pid1(sandbox, client))
    last, steady = -1, 0
    for _ in range(200):  # 20 s at most
        rss = _status_kb(agent, "VmRSS")
        steady = steady + 1 if rss == last else 0
        if steady >= 3:
            break
        last = rss
        await asyncio.sleep(0.1)
    pid1 = _slot_pid1(sandbox, client)
    return {
        "cgroupMb": round(_cgroup_memory(pid1) / 1e6, 1),
        "agentRssAnonMb": round(_status_kb(agent, "RssAnon") / 1e3, 1),
        "agentRssMb": round(_status_kb(agent, "VmRSS") / 1e3, 1),
    }


def image_size_mb(client: docker.DockerClient, tag: str) -> float:
    return round(int(client.images.get(tag).attrs["Size"]) / 1e6, 1)


async def latencies(
    settings: Settings,
    client: docker.DockerClient,
    image: str,
    engine: str,
    code: str,
    runs: int,
    *,
    warm: bool,
    slot_facts: list[dict[str, float]] | None = None,
) -> list[float]:
    """Latencies of ``code`` (the first run dropped); warm, each task waits until the
    slot's agent has settled, and ``slot_facts`` gets its memory and preload time."""
    values = settings.model_dump()
    values["pool_size"] = 1 if warm else 0
    settings = Settings(**values)
    if engine == "oci":
        runtime = oci_runtime(settings)
        if isinstance(runtime, str):
            raise SystemExit(f"the OCI backend cannot run here: {runtime}")
        sandbox: Any = make_oci_sandbox(settings, client, runtime, image=image, warm_pool=warm)
    else:
        sandbox = make_docker_sandbox(
            settings, docker.from_env(timeout=60), image=image, ensure_image=None, warm_pool=warm
        )
    pipeline = make_pipeline(settings, sandbox, image=image, image_id=None, isolation={})
    samples = []
    try:
        for _ in range(runs + 1):  # the first is a warm-up, dropped
            await sandbox.warm_up(wait=True)
            memory = await settled_slot(sandbox, client) if warm else {}
            started = time.perf_counter()
            report = await pipeline.run(TaskRequest(code=code, items=ITEMS))
            samples.append((time.perf_counter() - started) * 1000)
            if not report.is_success:
                raise SystemExit(json.dumps(report.document(), default=str)[:2000])
            if slot_facts is not None and warm:
                preload_ms = report.audit["details"].get("agentPreloadMs")
                slot_facts.append({**memory, "preloadMs": preload_ms or 0.0})
    finally:
        await sandbox.aclose()
    return samples[1:]


async def measure(engine: str, runs: int = 5) -> dict[str, Any]:
    """``make bench``'s section (bench/run.py): the pandas task cold, warm, and warm
    with ``preload = ["pandas"]`` on ``engine``, ``runs`` tasks each (the first of each
    series dropped besides), and an idle slot's memory with and without the preload.
    Builds the packages image first if it is missing (the wheels from the host's cache,
    downloaded once)."""
    client = docker.from_env(timeout=300)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = Settings(runner_id="bench-packages", pool_size=0)
            settings = Settings(
                **{
                    **base.model_dump(),
                    "policy_dir": packages_bundle(Path(tmp) / "policies"),
                    "external_allow": PANDAS_EXTERNAL_ALLOW,
                }
            )
            builder = ImageBuilder(client, image_recipe(settings), lambda line: None)
            image = await asyncio.to_thread(builder.ensure)
            preloading = Settings(
                **{**settings.model_dump(), "policy_dir": preload_bundle(Path(tmp) / "preload")}
            )
            out: dict[str, Any] = {"engine": engine, "runs": runs}
            slots: dict[str, list[dict[str, float]]] = {"noPreload": [], "preload": []}
            for name, run_settings, warm, facts in (
                ("cold", settings, False, "noPreload"),
                ("warm", settings, True, "noPreload"),
                ("warmPreload", preloading, True, "preload"),
            ):
                samples = await latencies(
                    run_settings,
                    client,
                    image,
                    engine,
                    PANDAS_TASK,
                    runs,
                    warm=warm,
                    slot_facts=slots[facts],
                )
                out[f"{name}Ms"] = {
                    "p50": round(percentile(samples, 50), 1),
                    "p95": round(percentile(samples, 95), 1),
                }
            out["idleSlotCgroupMb"] = {
                which: round(percentile([fact["cgroupMb"] for fact in facts], 50), 1)
                for which, facts in slots.items()
            }
            out["preloadMs"] = round(percentile([f["preloadMs"] for f in slots["preload"]], 50), 1)
    finally:
        client.close()
    out["tookS"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--engine", choices=("docker", "oci"), default="docker")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)

    client = docker.from_env(timeout=300)
    base = Settings(runner_id="bench-packages", pool_size=0)
    default_image = ImageBuilder(client, image_recipe(base), lambda line: None).ensure()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = packages_bundle(Path(tmp) / "policies")
        settings = Settings(
            **{**base.model_dump(), "policy_dir": bundle, "external_allow": PANDAS_EXTERNAL_ALLOW}
        )
        builder = ImageBuilder(client, image_recipe(settings), lambda line: None)
        out: dict[str, Any] = {}
        if args.rebuild:
            tag = builder.current_tag()
            if tag is not None and builder.image_id(tag) is not None:
                client.images.remove(tag, force=True)
            started = time.perf_counter()
            image = builder.ensure()
            out["buildWarmCacheS"] = round(time.perf_counter() - started, 1)
        else:
            image = builder.ensure()
        out["imageMb"] = {
            "default": image_size_mb(client, default_image),
            "packages": image_size_mb(client, image),
        }
        preloading = Settings(
            **{**settings.model_dump(), "policy_dir": preload_bundle(Path(tmp) / "preload")}
        )
        slots: dict[str, list[dict[str, float]]] = {"noPreload": [], "preload": []}
        series = (
            ("stdlib", STDLIB_TASK, settings, (False, True), "noPreload"),
            ("pandas", PANDAS_TASK, settings, (False, True), "noPreload"),
            ("stdlibPreload", STDLIB_TASK, preloading, (True,), "preload"),
            ("pandasPreload", PANDAS_TASK, preloading, (True,), "preload"),
        )
        for name, code, run_settings, modes, facts in series:
            for warm in modes:
                samples = asyncio.run(
                    latencies(
                        run_settings,
                        client,
                        image,
                        args.engine,
                        code,
                        args.runs,
                        warm=warm,
                        slot_facts=slots[facts],
                    )
                )
                out[f"{name}{'Warm' if warm else 'Cold'}Ms"] = {
                    "p50": round(percentile(samples, 50), 1),
                    "p95": round(percentile(samples, 95), 1),
                }
        out["idleSlot"] = {
            which: {
                key: round(percentile([fact[key] for fact in facts], 50), 1)
                for key in ("cgroupMb", "agentRssAnonMb", "agentRssMb", "preloadMs")
            }
            for which, facts in slots.items()
        }
    out["engine"] = args.engine
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
