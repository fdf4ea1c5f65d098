"""``[image] preload``: a warm slot's agent imports pandas before its task, on the real
engines (issue 14, item 4).

The bundle is the tests' packages bundle (numpy, pandas and their lock) with
``external_allow = ["numpy", "pandas", "dateutil"]``, ``preload = ["pandas"]`` and a
tenant ``basic`` whose profile allows numpy only (:func:`helpers.preload_bundle`); the
image is the packages image (``preload`` is no input of the image: the same one).

Nothing here times anything. That the preload saves a warm task its import is shown
by what the task itself sees (``'pandas' in sys.modules`` before its own ``import``)
and by what the agent reports in the audit record; the figures are bench/README.md's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import preload_bundle

from runner.cli.wiring import image_recipe
from runner.errors import RunnerError
from runner.pipeline import TaskPipeline
from runner.sandbox.base import Outcome, Stage
from runner.sandbox.image import ImageBuilder
from runner.settings import Settings

from .conftest import PipelineFactory, pipeline_factory, request

BASIC = """\
version = 1

[imports]
stdlib_allow = ["sys", "json"]
external_allow = ["numpy"]
"""

# ``sys`` is on the allowlists here (settings and profile) only so that a task can look.
# The matrix product runs OpenBLAS, whose threads the agent started at its import of
# numpy (through pandas) and shut down for the fork: the child starts its own.
SEES_PANDAS = """
import sys
before = "pandas" in sys.modules
import numpy as np
import pandas as pd
df = pd.DataFrame({"k": ["a", "b", "a"], "n": [1, 2, 3]})
m = np.arange(256 * 256, dtype=np.float64).reshape(256, 256)
trace = float((m @ m.T).trace())
return [{"json": {"before": before, "sums": df.groupby("k")["n"].sum().to_dict(),
                  "trace": trace}}]
"""
TRACE = float(sum(x * x for x in range(256 * 256)))
LOOKS_FOR_PANDAS = """
import sys
return [{"json": {"loaded": sorted(m for m in sys.modules if m.split(".")[0] == "pandas")}}]
"""


@pytest.fixture(scope="session")
def preload_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preload_bundle(tmp_path_factory.mktemp("preload") / "policies", tenants={"basic": BASIC})


@pytest.fixture(scope="session")
def preload_settings(base_settings: Settings, preload_policy_dir: Path) -> Settings:
    values = {**base_settings.model_dump(), "policy_dir": preload_policy_dir}
    return Settings(**{**values, "stdlib_allow": "sys,json"})


@pytest.fixture(scope="session")
def preload_image(docker_client: docker.DockerClient, preload_settings: Settings) -> str:
    builder = ImageBuilder(docker_client, image_recipe(preload_settings), lambda line: None)
    try:
        return builder.ensure()
    except RunnerError as exc:
        pytest.fail(f"cannot build the task image with numpy and pandas: {exc}", pytrace=False)


@pytest.fixture
def make_preload_pipeline(
    preload_settings: Settings, preload_image: str, backend: str
) -> PipelineFactory:
    return pipeline_factory(preload_settings, preload_image, backend=backend)


async def test_a_warm_slot_hands_its_task_pandas_already_imported(
    make_preload_pipeline: PipelineFactory,
) -> None:
    async with make_preload_pipeline(warm=True) as pipeline:
        report = await pipeline.run(request(SEES_PANDAS))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == [{"json": {"before": True, "sums": {"a": 4, "b": 2}, "trace": TRACE}}]
    details = report.audit["details"]
    assert details["containerStart"] == "warm"
    assert details["agentPreloaded"] == ["pandas"]
    assert details["agentPreloadMs"] > 0


async def test_a_cold_container_preloads_nothing(make_preload_pipeline: PipelineFactory) -> None:
    # Its agent gets its task at once: a preload would only move the task's own import
    # earlier, and cost every task that does not import pandas.
    async with make_preload_pipeline() as pipeline:
        report = await pipeline.run(request(SEES_PANDAS))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == [{"json": {"before": False, "sums": {"a": 4, "b": 2}, "trace": TRACE}}]
    details = report.audit["details"]
    assert details["containerStart"] == "cold"
    assert "agentPreloaded" not in details


async def run_as(pipeline: TaskPipeline, tenant: str | None, code: str) -> dict[str, Any]:
    report = await pipeline.run(request(code, profile=pipeline.profile_for(tenant)))
    return report.document()


async def test_a_tenant_that_may_not_import_a_preloaded_module_never_gets_the_slot(
    make_preload_pipeline: PipelineFactory,
) -> None:
    async with make_preload_pipeline(warm=True) as pipeline:
        basic = await run_as(pipeline, "basic", LOOKS_FOR_PANDAS)
        refused = await run_as(pipeline, "basic", "import pandas\nreturn []")
        # The slot that preloaded pandas is still there, for a task that may have it.
        default = await run_as(pipeline, None, LOOKS_FOR_PANDAS)
    assert basic["status"] == "success", basic
    assert basic["result"] == [{"json": {"loaded": []}}]
    assert basic["audit"]["details"]["containerStart"] == "cold"
    assert basic["audit"]["details"]["coldReason"] == "preload_not_allowed"
    assert "agentPreloaded" not in basic["audit"]["details"]
    assert basic["audit"]["tenant"]["name"] == "basic"

    assert refused["status"] == "error", refused
    assert refused["error"]["stage"] == Stage.ANALYZE.value
    assert refused["error"]["description"] == (
        "Line 1: Import of external package 'pandas' is disallowed. "
        "Allowed external packages: numpy"
    )

    assert default["status"] == "success", default
    assert default["audit"]["details"]["containerStart"] == "warm"
    assert default["audit"]["details"]["agentPreloaded"] == ["pandas"]
    loaded = default["result"][0]["json"]["loaded"]
    assert "pandas" in loaded
    assert "pandas.core.frame" in loaded
