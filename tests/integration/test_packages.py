"""numpy and pandas in the task image, on the real engines (issue 14, packages).

The image is built from a second bundle: the default one with ``[image]
python_packages = ["numpy==2.*", "pandas"]`` and the committed lock of them
(``tests/fixtures/python-packages.lock``; :func:`helpers.packages_bundle`). The wheels
come from the host's wheel cache (downloaded once, hashes checked), and the image is
tagged by the lock's hash, so a second ``ensure`` builds nothing. Tasks import the
packages when the allowlist names them and are refused by the analyzer, with n8n's
message and no container, when it does not. Under the policy's own container (read-only
root, ``/tmp`` noexec, no ``/dev/shm``, our seccomp profile, the pids limit): nothing of
it is loosened for them.
"""

from __future__ import annotations

from pathlib import Path

import docker
import pytest
from helpers import PANDAS_EXTERNAL_ALLOW, TEST_PACKAGES_LOCK, packages_bundle

from runner.cli.wiring import image_recipe
from runner.errors import RunnerError
from runner.sandbox.base import Outcome, Stage
from runner.sandbox.image import ImageBuilder
from runner.sandbox.packages import parse_lock
from runner.settings import Settings

from .conftest import PipelineFactory, pipeline_factory, request

PANDAS_TASK = """
import numpy as np
import pandas as pd

df = pd.DataFrame({"city": ["a", "b", "a", "c"], "n": [1, 2, 3, 4]})
totals = df.groupby("city")["n"].sum().to_dict()
m = np.arange(256 * 256, dtype=np.float64).reshape(256, 256)
product = float((m @ m.T).trace())  # BLAS: OpenBLAS threads, under the pids limit
when = pd.Timestamp("2024-03-01") + pd.Timedelta(days=1)
return [{"json": {"totals": totals, "trace": product, "when": when.isoformat(),
                  "numpy": np.__version__, "pandas": pd.__version__}}]
"""


@pytest.fixture(scope="session")
def packages_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packages_bundle(tmp_path_factory.mktemp("packages") / "policies")


@pytest.fixture(scope="session")
def packages_settings(base_settings: Settings, packages_policy_dir: Path) -> Settings:
    return Settings(**{**base_settings.model_dump(), "policy_dir": packages_policy_dir})


@pytest.fixture(scope="session")
def packages_image(docker_client: docker.DockerClient, packages_settings: Settings) -> str:
    builder = ImageBuilder(docker_client, image_recipe(packages_settings), lambda line: None)
    try:
        return builder.ensure()
    except RunnerError as exc:
        pytest.fail(f"cannot build the task image with numpy and pandas: {exc}", pytrace=False)


@pytest.fixture
def make_packages_pipeline(
    packages_settings: Settings, packages_image: str, backend: str
) -> PipelineFactory:
    return pipeline_factory(packages_settings, packages_image, backend=backend)


LOCK = parse_lock(TEST_PACKAGES_LOCK.read_text(encoding="utf-8"))
VERSIONS = {wheel.name: wheel.version for wheel in LOCK.wheels}


async def test_a_task_imports_numpy_and_pandas_when_allowed(
    make_packages_pipeline: PipelineFactory,
) -> None:
    async with make_packages_pipeline(external_allow=PANDAS_EXTERNAL_ALLOW) as pipeline:
        report = await pipeline.run(request(PANDAS_TASK))
    assert report.outcome is Outcome.SUCCESS, report.document()
    (item,) = report.result
    assert item["json"]["totals"] == {"a": 4, "b": 2, "c": 4}
    m = [[float(i * 256 + j) for j in range(256)] for i in range(256)]
    assert item["json"]["trace"] == sum(sum(x * x for x in row) for row in m)
    assert item["json"]["when"] == "2024-03-02T00:00:00"
    assert item["json"]["numpy"] == VERSIONS["numpy"]
    assert item["json"]["pandas"] == VERSIONS["pandas"]


async def test_a_warm_slot_runs_a_pandas_task(
    make_packages_pipeline: PipelineFactory,
) -> None:
    async with make_packages_pipeline(external_allow=PANDAS_EXTERNAL_ALLOW, warm=True) as pipeline:
        report = await pipeline.run(request(PANDAS_TASK))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.audit["details"]["containerStart"] == "warm"


@pytest.mark.parametrize(
    ("external_allow", "listed"),
    [pytest.param("", "none", id="nothing-allowed"), pytest.param("numpy", "numpy", id="numpy")],
)
async def test_the_analyzer_refuses_pandas_when_not_allowed(
    make_packages_pipeline: PipelineFactory,
    external_allow: str,
    listed: str,
) -> None:
    async with make_packages_pipeline(external_allow=external_allow) as pipeline:
        report = await pipeline.run(request("import pandas as pd\nreturn []"))
    assert report.outcome is Outcome.SECURITY_VIOLATION
    assert report.error is not None
    assert report.error.stage is Stage.ANALYZE  # before any container
    assert report.error.description == (
        "Line 1: Import of external package 'pandas' is disallowed. "
        f"Allowed external packages: {listed}"
    )
    assert report.record.container_id is None


async def test_pandas_needs_its_dependency_allowed_and_says_which(
    make_packages_pipeline: PipelineFactory,
) -> None:
    # pandas loads dateutil's submodules through importlib, which the in-container
    # check guards too: without dateutil on the list the import stops there, by name.
    async with make_packages_pipeline(external_allow="numpy,pandas") as pipeline:
        report = await pipeline.run(request("import pandas\nreturn []"))
    assert report.outcome is Outcome.SECURITY_VIOLATION, report.document()
    assert report.error is not None
    assert report.error.stage is Stage.RUN
    assert "Import of external package 'dateutil" in report.error.description


IMAGE_FACTS = """
import importlib.metadata, os, stat
root = "/opt/sandbox-packages"
facts = {"versions": {d.metadata["Name"].lower(): d.version
                      for d in importlib.metadata.distributions(path=[root])}}
bad = []
for top, dirs, files in os.walk(root):
    for name in dirs + files:
        st = os.lstat(os.path.join(top, name))
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | 0o7000):
            bad.append(os.path.join(top, name))
facts["notRootOnly"] = bad[:5]
try:
    open(os.path.join(root, "numpy", "planted.py"), "w")
    facts["write"] = "written"
except OSError as exc:
    facts["write"] = exc.errno
try:
    import pip
    facts["pip"] = pip.__file__
except ImportError:
    facts["pip"] = None
facts["pth"] = [p for p in __import__("sys").path if "sandbox-packages" in p]
return [{"json": facts}]
"""


async def test_the_packages_are_the_locked_ones_read_only_and_without_pip(
    make_packages_pipeline: PipelineFactory,
) -> None:
    async with make_packages_pipeline(guards_off=True) as pipeline:
        report = await pipeline.run(request(IMAGE_FACTS))
    assert report.outcome is Outcome.SUCCESS, report.document()
    facts = report.result[0]["json"]
    assert {name.replace("_", "-"): v for name, v in facts["versions"].items()} == VERSIONS
    assert facts["notRootOnly"] == []
    assert facts["write"] == 30  # EROFS: the read-only root
    assert facts["pip"] is None
    assert facts["pth"] == ["/opt/sandbox-packages"]


def test_an_unchanged_lock_builds_nothing(
    docker_client: docker.DockerClient, packages_settings: Settings, packages_image: str
) -> None:
    lines: list[str] = []
    builder = ImageBuilder(docker_client, image_recipe(packages_settings), lines.append)
    assert builder.current_tag() == packages_image
    assert builder.ensure() == packages_image
    assert lines == []  # no download, no staging, no build
    image = docker_client.images.get(packages_image)
    assert image.labels["io.sandbox-runner.python-packages-lock"] == LOCK.sha256
