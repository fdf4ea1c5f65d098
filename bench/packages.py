"""What numpy and pandas in the task image cost (issue 14; not part of ``make bench``).

``python -m bench.packages [--runs N] [--engine docker|oci] [--rebuild]``: the default
task image and the image of the tests' packages bundle (the default bundle with
``python_packages = ["numpy==2.*", "pandas"]`` and ``tests/fixtures/python-packages.lock``),
side by side:

- the size of each image (Docker's ``Size``);
- with ``--rebuild``, the packages image removed and built again with the wheel cache
  warm (what ``make image`` costs after the lock changed, the wheels being cached);
- the latency of one task through our pipeline, cold (no pool: what ``exec`` pays per
  task) and warm (a pool of one slot, refilled before each task), for a stdlib task
  (sum 1,000 ints) and a pandas task (a DataFrame group-by) in the packages image.

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
from helpers import PANDAS_EXTERNAL_ALLOW, packages_bundle

STDLIB_TASK = "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]"
PANDAS_TASK = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'k': ['a', 'b', 'a'], 'n': [1, 2, 3]})\n"
    "return [{'json': df.groupby('k')['n'].sum().to_dict()}]"
)
ITEMS = [{"json": {"values": list(range(1000))}}]


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
) -> list[float]:
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
            started = time.perf_counter()
            report = await pipeline.run(TaskRequest(code=code, items=ITEMS))
            samples.append((time.perf_counter() - started) * 1000)
            if not report.is_success:
                raise SystemExit(json.dumps(report.document(), default=str)[:2000])
    finally:
        await sandbox.aclose()
    return samples[1:]


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
        for name, code in (("stdlib", STDLIB_TASK), ("pandas", PANDAS_TASK)):
            for warm in (False, True):
                samples = asyncio.run(
                    latencies(settings, client, image, args.engine, code, args.runs, warm=warm)
                )
                out[f"{name}{'Warm' if warm else 'Cold'}Ms"] = {
                    "p50": round(percentile(samples, 50), 1),
                    "p95": round(percentile(samples, 95), 1),
                }
    out["engine"] = args.engine
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
