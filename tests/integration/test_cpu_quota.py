"""The CPU quota in force, read from inside a task container on the real engine.

b3a21b2 turned ``cpus: 1e-10`` into ``NanoCpus`` 0, which Docker reads as no limit:
inside the container ``cpu.cfs_quota_us`` was -1. Now the smallest quota a task can
get is Docker's minimum (0.01 CPU: 1 ms per 100 ms period), and a smaller value
never reaches the engine. The cgroup version is detected inside the container. On
both engines: Docker, and an OCI runtime driven directly (whose config renders the
same quota from the same spec).
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from runner.errors import ConfigurationError

from .conftest import PipelineFactory, request

pytestmark = pytest.mark.docker

READ_QUOTA = """
import os

def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None

if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
    quota, _, period = (read("/sys/fs/cgroup/cpu.max") or "").partition(" ")
    return {"cgroup": "v2", "quota": quota, "period": period}
for root in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
    quota = read(root + "/cpu.cfs_quota_us")
    if quota is not None:
        return {"cgroup": "v1", "quota": quota, "period": read(root + "/cpu.cfs_period_us")}
return None
"""


@pytest.mark.parametrize(("cpus", "quota_us"), [(0.01, 1000), (0.57, 57000)])
async def test_the_quota_in_force_is_the_one_asked_for(
    make_task_pipeline: PipelineFactory, cpus: float, quota_us: int
) -> None:
    async with make_task_pipeline(guards_off=True, cpus=cpus) as pipeline:
        report = await pipeline.run(request(READ_QUOTA))
    assert report.error is None, report.error
    found = report.result
    assert found is not None, "no CPU quota file in the task's cgroup"
    assert int(found["period"]) == 100_000
    assert int(found["quota"]) == quota_us  # never -1 / "max": never unlimited
    assert report.audit["limits"]["cpus"] == cpus
    assert report.audit["limits"]["nanoCpus"] == round(cpus * 1e9)


async def test_a_quota_that_rounds_to_nothing_never_reaches_the_engine(
    make_task_pipeline: PipelineFactory,
) -> None:
    async with make_task_pipeline(guards_off=True) as pipeline:
        tiny = replace(pipeline.limits, cpus=1e-10)
        with pytest.raises(ConfigurationError, match=re.escape("cpus 1e-10 < 0.01")):
            await pipeline.run(request(READ_QUOTA, limits=tiny))
