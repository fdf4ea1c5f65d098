"""Two tenants, two profiles, one ``sandbox-runner up``: each task runs under its tenant's.

The bundle is ``policies/`` with two tenant profiles added (``tenants/data.toml``: 512
MiB and the ``statistics`` module; ``tenants/basic.toml``: 128 MiB and ``json`` only).
Two API keys map to the two tenants. Through the HTTP API, in both modes (all items,
per item), real task containers prove the profile of each: ``data`` imports
``statistics`` and fills 300 MiB; ``basic`` is refused the same import by the analyzer
with n8n's message, and the same 300 MiB kill its task (``memory_limit_exceeded``).
Every audit record names the tenant and the hash of its profile. Once per engine.
A third tenant, ``isolated``, must run under gVisor (``runtime = "gvisor"``): those
runners refuse its tasks (``profile_unavailable``), an ``up`` on runsc runs them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.policy import parse_bundle
from runner.settings import PROJECT_ROOT
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
    "data.toml": "version = 1\n[limits]\nmemory_mb = 512\n"
    '[imports]\nstdlib_allow = ["json", "statistics"]\n',
    "basic.toml": 'version = 1\n[limits]\nmemory_mb = 128\n[imports]\nstdlib_allow = ["json"]\n',
    "isolated.toml": 'version = 1\nruntime = "gvisor"\n',
}
STATISTICS = "import statistics\nreturn [{'json': {'mean': statistics.mean([1, 2, 3])}}]"
PER_ITEM = "import statistics\nreturn {'mean': statistics.mean(_item['json']['xs'])}"
FILL_300_MIB = "block = bytearray(300 * 1024 * 1024)\nreturn [{'json': {'n': len(block)}}]"
N8N_REFUSAL = (
    "Line 1: Import of standard library module 'statistics' is disallowed. "
    "Allowed stdlib modules: json"
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tenants") / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", directory)
    (directory / "tenants").mkdir()
    for name, text in PROFILES.items():
        (directory / "tenants" / name).write_text(text)
    return directory


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
