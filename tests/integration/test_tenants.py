"""Two tenants, two profiles, one ``sandbox-runner up``: each task runs under its tenant's.

The bundle is ``policies/`` with an image variant and tenant profiles added
(``[image.variants.science]``: numpy and pandas from the tests' committed lock;
``tenants/data.toml``: 512 MiB, the ``statistics`` module, the ``science`` image and
pandas; ``tenants/basic.toml``: 128 MiB and ``json`` only, the default image, which
holds no third-party package). Two API keys map to the two tenants. Through the HTTP
API, in both modes (all items, per item), real task containers prove the profile of
each: ``data`` imports ``statistics`` and pandas on its image and fills 300 MiB;
``basic`` is refused the same imports by the analyzer with n8n's messages, and the
same 300 MiB kill its task (``memory_limit_exceeded``). Every audit record names the
tenant, the hash of its profile and the image its task ran on. Once per engine.
A third tenant, ``isolated``, must run under gVisor (``runtime = "gvisor"``): those
runners refuse its tasks (``profile_unavailable``), an ``up`` on runsc runs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from helpers import sandbox_runner, variant_bundle

from runner.cli.wiring import image_recipe
from runner.policy import parse_bundle
from runner.sandbox.image import ImageBuilder
from runner.settings import PROJECT_ROOT, Settings
from runner.testing import UpProcess

from .conftest import BACKENDS

pytestmark = pytest.mark.timeout(600)

DATA = {"Authorization": "Bearer tenant-data-key-0123456789"}
BASIC = {"Authorization": "Bearer tenant-basic-key-0123456789"}
ISOLATED = {"Authorization": "Bearer tenant-isolated-key-0123456789"}
KEYS = (
    "tenant-data-key-0123456789=data,tenant-basic-key-0123456789=basic,"
    "tenant-isolated-key-0123456789=isolated"
)
PROFILES = {
    "data": 'version = 1\nimage_variant = "science"\n[limits]\nmemory_mb = 512\n'
    '[imports]\nstdlib_allow = ["json", "statistics"]\n'
    'external_allow = ["numpy", "pandas", "dateutil"]\n',  # helpers.PANDAS_EXTERNAL_ALLOW
    "basic": 'version = 1\n[limits]\nmemory_mb = 128\n[imports]\nstdlib_allow = ["json"]\n',
    "isolated": 'version = 1\nruntime = "gvisor"\n',
}
STATISTICS = "import statistics\nreturn [{'json': {'mean': statistics.mean([1, 2, 3])}}]"
PER_ITEM = "import statistics\nreturn {'mean': statistics.mean(_item['json']['xs'])}"
FILL_300_MIB = "block = bytearray(300 * 1024 * 1024)\nreturn [{'json': {'n': len(block)}}]"
PANDAS = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'n': [1, 2, 3]})\n"
    "return [{'json': {'sum': int(df['n'].sum()), 'pandas': pd.__version__}}]"
)
PANDAS_PER_ITEM = "import pandas as pd\nreturn {'sum': int(pd.Series(_item['json']['xs']).sum())}"
N8N_PANDAS_REFUSAL = (
    "Line 1: Import of external package 'pandas' is disallowed. Allowed external packages: "
)
N8N_REFUSAL = (
    "Line 1: Import of standard library module 'statistics' is disallowed. "
    "Allowed stdlib modules: json"
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("tenants") / "policies"
    return variant_bundle(destination, PROJECT_ROOT / "policies", "science", PROFILES)


@pytest.fixture(scope="module")
def science_image(bundle: Path) -> tuple[str, str]:
    """The ``science`` variant's image (tag, id): its runner builds it when missing."""
    settings = Settings(policy_dir=bundle)
    client = docker.from_env()
    try:
        builder = ImageBuilder(client, image_recipe(settings, variant="science"), lambda _: None)
        tag = builder.ensure()
        image_id = builder.image_id(tag)
    finally:
        client.close()
    assert image_id is not None
    return tag, image_id


@pytest.fixture(scope="module")
def profile_sha(bundle: Path) -> dict[str, str]:
    parsed, findings = parse_bundle(bundle)
    assert parsed is not None, findings
    return {name: profile.sha256 for name, profile in parsed.tenants.items()}


@pytest.fixture(scope="module", params=BACKENDS)
def up(request: pytest.FixtureRequest, bundle: Path) -> Iterator[UpProcess]:
    backend: str = request.param
    process = UpProcess(
        {
            "SANDBOX_API_KEYS": KEYS,
            "SANDBOX_POLICY_DIR": str(bundle),
            "SANDBOX_RUNNER_ID": f"pytest-tenants-{backend}",
            "SANDBOX_BACKEND": backend,
        }
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gvisor_up(bundle: Path) -> Iterator[UpProcess]:
    process = UpProcess(
        {
            "SANDBOX_API_KEYS": KEYS,
            "SANDBOX_POLICY_DIR": str(bundle),
            "SANDBOX_RUNNER_ID": "pytest-tenants-gvisor",
            "SANDBOX_BACKEND": "oci",
            "SANDBOX_OCI_RUNTIME": "runsc",
        }
    )
    yield process
    process.stop()


def run(up: UpProcess, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{up.url}/v1/tasks", params={"wait": 120}, json=body, headers=headers, timeout=150
    )
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_data_may_import_statistics_in_both_modes(
    up: UpProcess, profile_sha: dict[str, str]
) -> None:
    document = run(up, DATA, code=STATISTICS, items=[{}])
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"mean": 2}}]
    assert document["audit"]["tenant"] == {
        "name": "data",
        "profile": "tenants/data.toml",
        "profileSha256": profile_sha["data"],
    }
    assert document["audit"]["limits"]["memoryBytes"] == 512 * 1024 * 1024
    per_item = run(up, DATA, code=PER_ITEM, items=[{"xs": [1, 3]}, {"xs": [2, 4]}], mode="per_item")
    assert per_item["status"] == "success", per_item
    assert [item["json"]["mean"] for item in per_item["result"]] == [2, 3]


def test_basic_is_refused_the_same_import_with_n8ns_message_in_both_modes(
    up: UpProcess, profile_sha: dict[str, str]
) -> None:
    for mode, code in (("all_items", STATISTICS), ("per_item", PER_ITEM)):
        document = run(up, BASIC, code=code, items=[{"xs": [1]}], mode=mode)
        assert document["status"] == "error", document
        assert document["error"]["code"] == "security_violation"
        assert document["error"]["stage"] == "analyze"
        assert document["error"]["message"] == "Security violations detected"
        assert document["error"]["description"].startswith(N8N_REFUSAL)
        assert document["audit"]["containerId"] is None  # no container was made
        assert document["audit"]["tenant"]["profileSha256"] == profile_sha["basic"]


def test_data_imports_pandas_on_its_image_variant_in_both_modes(
    up: UpProcess, science_image: tuple[str, str]
) -> None:
    document = run(up, DATA, code=PANDAS, items=[{}])
    assert document["status"] == "success", document
    [item] = document["result"]
    assert item["json"]["sum"] == 6
    audit = document["audit"]
    assert (audit["image"], audit["imageId"], audit["imageVariant"]) == (
        science_image[0],
        science_image[1],
        "science",
    )
    per_item = run(
        up, DATA, code=PANDAS_PER_ITEM, items=[{"xs": [1, 2]}, {"xs": [3, 4]}], mode="per_item"
    )
    assert per_item["status"] == "success", per_item
    assert [item["json"]["sum"] for item in per_item["result"]] == [3, 7]
    assert per_item["audit"]["imageVariant"] == "science"


def test_basic_runs_on_the_default_image_and_is_refused_pandas_in_both_modes(
    up: UpProcess, science_image: tuple[str, str]
) -> None:
    plain = run(up, BASIC, code="return [{'json': {'ok': True}}]")
    assert plain["status"] == "success", plain
    assert plain["audit"]["image"] != science_image[0]
    assert plain["audit"]["imageId"] != science_image[1]
    assert "imageVariant" not in plain["audit"]
    for mode, code in (("all_items", PANDAS), ("per_item", PANDAS_PER_ITEM)):
        document = run(up, BASIC, code=code, items=[{"xs": [1]}], mode=mode)
        assert document["status"] == "error", document
        assert document["error"]["code"] == "security_violation"
        assert document["error"]["stage"] == "analyze"
        assert document["error"]["description"].startswith(N8N_PANDAS_REFUSAL)
        assert document["audit"]["containerId"] is None  # no container was made


def test_selfcheck_proves_an_image_variant_on_demand(
    bundle: Path, science_image: tuple[str, str], tmp_path: Path
) -> None:
    env = {"SANDBOX_POLICY_DIR": str(bundle), "SANDBOX_SELFCHECK_CACHE_DIR": str(tmp_path)}
    checked = sandbox_runner("selfcheck", "--json", "--variant", "science", env=env)
    assert checked.returncode == 0, checked.stderr
    document = json.loads(checked.stdout)
    assert document["ok"] is True
    assert document["imageVariant"] == "science"
    unknown = sandbox_runner("selfcheck", "--variant", "gpu", env=env)
    assert unknown.returncode == 2
    assert "no image variant 'gpu'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_each_tenant_gets_its_own_memory_limit(up: UpProcess) -> None:
    data = run(up, DATA, code=FILL_300_MIB)
    assert data["status"] == "success", data
    assert data["result"] == [{"json": {"n": 300 * 1024 * 1024}}]
    basic = run(up, BASIC, code=FILL_300_MIB)
    assert basic["status"] == "error", basic
    assert basic["error"]["code"] == "memory_limit_exceeded"
    assert basic["audit"]["limits"]["memoryBytes"] == 128 * 1024 * 1024


def test_the_api_refuses_basic_more_memory_than_its_profile(up: UpProcess) -> None:
    response = httpx.post(
        f"{up.url}/v1/tasks",
        json={"code": "return []", "memoryMb": 256},
        headers=BASIC,
        timeout=30,
    )
    assert response.status_code == 422
    assert "tenants/basic.toml" in response.json()["detail"]


def test_a_gvisor_tenant_is_refused_by_a_runner_without_gvisor(up: UpProcess) -> None:
    document = run(up, ISOLATED, code="return [{'json': {}}]")
    assert document["status"] == "error", document
    assert document["error"]["code"] == "profile_unavailable"
    assert document["error"]["message"].startswith(
        "Tenant isolated's profile (tenants/isolated.toml) requires the gvisor runtime tier"
    )


def test_a_gvisor_tenant_runs_on_a_runner_on_runsc(
    gvisor_up: UpProcess, profile_sha: dict[str, str]
) -> None:
    document = run(gvisor_up, ISOLATED, code="return [{'json': {'n': sum(range(10))}}]")
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"n": 45}}]
    assert document["audit"]["isolation"]["runtime"].startswith("runsc")
    assert document["audit"]["tenant"]["profileSha256"] == profile_sha["isolated"]
    # The other tenants' profiles apply on this runner too.
    refused = run(gvisor_up, BASIC, code=STATISTICS)
    assert refused["error"]["code"] == "security_violation"
