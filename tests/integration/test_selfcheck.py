"""The self-check against the real engines: canaries under the real policy prove every
required guarantee on Docker, on runc driven directly and on gVisor (runsc); a weakened
policy, or a container without one of its limits, makes it fail (and ``selfcheck``
exit 1); every task's audit record carries the policy hash and the guarantees in
force; and ``exec`` runs a task under gVisor end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import sandbox_runner

from runner.cli.wiring import backend_selfcheck
from runner.policy import DOCKER_DEFAULT_PROFILE, load_bundle
from runner.sandbox.oci import sandbox as oci_sandbox
from runner.selfcheck import SelfCheckCache, Status
from runner.settings import PROJECT_ROOT, Settings

POLICIES = PROJECT_ROOT / "policies"

# Whether this host's kernel has AppArmor enabled, read here rather than asked of the
# runner (whose answer is what is under test): the module's parameter reads "Y".
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")


def apparmor_enabled_here() -> bool:
    return APPARMOR_ENABLED.is_file() and APPARMOR_ENABLED.read_text().strip() == "Y"


HOST_HAS_APPARMOR = apparmor_enabled_here()

# Where the self-check must hold: Docker, runc driven directly, and the gVisor tier
# (runsc: another kernel answers the canaries, so other facts prove the guarantees).
ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "docker": ("docker", {}),
    "oci": ("oci", {"oci_runtime": "runc"}),
    "gvisor": ("oci", {"oci_runtime": "runsc"}),
}
GVISOR_ENV = {"SANDBOX_BACKEND": "oci", "SANDBOX_OCI_RUNTIME": "runsc"}


def weakened(tmp_path: Path, seccomp: str) -> Path:
    """A copy of policies/ whose seccomp profile is ``seccomp`` (JSON text)."""
    bundle = tmp_path / "weak-policy"
    shutil.copytree(POLICIES, bundle)
    (bundle / "seccomp" / "task.json").write_text(seccomp)
    return bundle


@pytest.mark.usefixtures("task_image")
@pytest.mark.parametrize("engine_name", list(ENGINES))
async def test_canaries_prove_every_required_guarantee(
    base_settings: Settings, tmp_path: Path, engine_name: str
) -> None:
    backend, overrides = ENGINES[engine_name]
    settings = Settings(
        **{**base_settings.model_dump(), "selfcheck_cache_dir": tmp_path, **overrides}
    )
    report, engine = await backend_selfcheck(settings, lambda _: None, backend=backend)
    assert engine["backend"] == backend
    assert ("runsc" in engine["runtime"]) is (engine_name == "gvisor")
    assert report.is_ok, report.as_json()
    found = {result.name: result for result in report.results}
    for name in load_bundle(POLICIES).config.selfcheck.required:
        assert found[name].status is Status.PASS, found[name]
    # In force where the kernel has it enabled, reported not available where not
    # (this project's reference machine has no AppArmor).
    expected = Status.PASS if HOST_HAS_APPARMOR else Status.NOT_AVAILABLE
    assert found["apparmor"].status is expected, found["apparmor"]
    assert report.policy_sha256 == load_bundle(POLICIES).sha256
    assert "OOM-killed" in found["memory-limit"].detail
    # The thread loop stopped exactly at the canary's pids (32), whatever counts them.
    assert "tasks + " in found["pids-limit"].detail
    if backend == "oci":  # the host read the canary container's cgroups too
        assert "on the host" in found["memory-limit"].detail
    if engine_name == "gvisor":
        assert "RLIMIT_NPROC [32, 32]" in found["pids-limit"].detail
        assert "prctl(PR_GET_NO_NEW_PRIVS): 1" in found["no-new-privileges"].detail
        assert "clone3 ENOSYS" in found["seccomp-profile"].detail
    # It passed, so the next start takes it from the cache.
    assert SelfCheckCache(tmp_path).get(report.key) is not None


def without(part: str, config: dict[str, Any]) -> dict[str, Any]:
    """A task container's config.json with one of its limits taken out."""
    if part == "nproc":  # the policy's RLIMIT_NPROC, not the task's pids (runc's way)
        for rlimit in config["process"]["rlimits"]:
            if rlimit["type"] == "RLIMIT_NPROC":
                rlimit["soft"] = rlimit["hard"] = 4096
    else:
        del config["linux"]["resources"][part]
    return config


@pytest.mark.usefixtures("task_image")
@pytest.mark.parametrize(
    ("engine_name", "part", "guarantee"),
    [
        ("oci", "memory", "memory-limit"),
        ("oci", "pids", "pids-limit"),
        ("oci", "cpu", "cpu-limit"),
        ("gvisor", "memory", "memory-limit"),
        ("gvisor", "pids", "pids-limit"),
        ("gvisor", "cpu", "cpu-limit"),
        # Under gVisor the sandbox kernel's RLIMIT_NPROC is what holds a task's threads.
        ("gvisor", "nproc", "pids-limit"),
    ],
)
async def test_a_container_without_a_limit_fails_that_guarantee(
    base_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine_name: str,
    part: str,
    guarantee: str,
) -> None:
    backend, overrides = ENGINES[engine_name]
    settings = Settings(
        **{**base_settings.model_dump(), "selfcheck_cache_dir": tmp_path, **overrides}
    )
    render = oci_sandbox.render
    monkeypatch.setattr(oci_sandbox, "render", lambda *a, **k: without(part, render(*a, **k)))
    report, _ = await backend_selfcheck(settings, lambda _: None, backend=backend)
    failed = {r.name: r.detail for r in report.results if r.status is Status.FAIL}
    assert list(failed) == [guarantee], report.as_json()
    assert not report.is_ok
    assert SelfCheckCache(tmp_path).get(report.key) is None  # failures are never cached


@pytest.mark.usefixtures("task_image")
def test_selfcheck_command_prints_every_guarantee(tmp_path: Path) -> None:
    done = sandbox_runner("selfcheck", env={"SANDBOX_SELFCHECK_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("seccomp-filter", "seccomp-profile", "no-new-privileges", "memory-limit"):
        assert any(line.startswith(f"  PASS  {name} ") for line in lines), name
    mark = "PASS" if HOST_HAS_APPARMOR else "N/A "
    assert any(line.startswith(f"  {mark}  apparmor ") for line in lines)
    assert lines[-1].startswith("result: OK")

    as_json = sandbox_runner(
        "selfcheck", "--json", env={"SANDBOX_SELFCHECK_CACHE_DIR": str(tmp_path)}
    )
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["ok"] is True


@pytest.mark.usefixtures("task_image")
@pytest.mark.parametrize(
    "seccomp",
    [
        pytest.param(DOCKER_DEFAULT_PROFILE.read_text(), id="docker-default-profile"),
        pytest.param(
            json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}), id="allow-default"
        ),
    ],
)
def test_selfcheck_fails_on_a_weakened_policy(tmp_path: Path, seccomp: str) -> None:
    bundle = weakened(tmp_path, seccomp)
    cache = tmp_path / "cache"
    # The linter rejects such a bundle: the runner would not even start with it.
    refused = sandbox_runner(
        "selfcheck", "--policy-dir", str(bundle), env={"SANDBOX_SELFCHECK_CACHE_DIR": str(cache)}
    )
    assert refused.returncode == 2
    assert "Invalid policy bundle" in refused.stderr
    # Diagnosed anyway, the canary shows that our profile is not what is in force.
    done = sandbox_runner(
        "selfcheck",
        "--policy-dir",
        str(bundle),
        "--skip-lint",
        env={"SANDBOX_SELFCHECK_CACHE_DIR": str(cache)},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fails `policy lint`" in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("  FAIL  seccomp-profile       required") for line in lines)
    assert any(line.startswith("  PASS  no-new-privileges") for line in lines)
    assert lines[-1].startswith("result: FAILED: required guarantees not in force: ")
    assert "seccomp-profile" in lines[-1]
    assert not cache.exists() or list(cache.iterdir()) == []  # failures are never cached


@pytest.mark.usefixtures("task_image")
def test_every_task_audit_record_carries_the_policy_and_the_guarantees(tmp_path: Path) -> None:
    env = {"SANDBOX_SELFCHECK_CACHE_DIR": str(tmp_path)}
    first = sandbox_runner("exec", "-", stdin="return 1", env=env)
    assert first.returncode == 0, first.stderr
    audit = json.loads(first.stdout)["audit"]
    sha = load_bundle(POLICIES).sha256
    assert audit["policySha256"] == sha
    isolation = audit["isolation"]
    assert isolation["policySha256"] == sha
    guarantees = isolation["guarantees"]
    assert guarantees["policySha256"] == sha
    assert guarantees["cached"] is False
    in_force = guarantees["inForce"]
    assert in_force["seccomp-profile"] == "pass"
    assert in_force["memory-limit"] == "pass"
    assert in_force["apparmor"] == ("pass" if HOST_HAS_APPARMOR else "not-available")
    # The second task of another process costs no canary: the result is cached.
    second = sandbox_runner("exec", "-", stdin="return 2", env=env)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)["audit"]["isolation"]["guarantees"]
    assert again["cached"] is True
    assert again["checkedAt"] == guarantees["checkedAt"]


@pytest.mark.usefixtures("task_image")
def test_a_setting_beyond_a_ceiling_stops_exec_before_docker(tmp_path: Path) -> None:
    done = sandbox_runner("exec", "-", stdin="return 1", env={"SANDBOX_PIDS_LIMIT": "100000"})
    assert done.returncode == 2
    assert "SANDBOX_PIDS_LIMIT=100000 is above the policy ceiling [limits] pids = 512" in (
        done.stderr
    )


@pytest.mark.usefixtures("task_image")
def test_exec_runs_a_task_under_gvisor_end_to_end(tmp_path: Path) -> None:
    # Through the product path: the self-check proves every required guarantee under
    # runsc first, then the task runs there, and it can start a thread.
    code = (
        "import threading\n"
        "box = []\n"
        "thread = threading.Thread(target=lambda: box.append(sum(range(10))))\n"
        "thread.start()\n"
        "thread.join()\n"
        "return [{'json': {'fromThread': box[0]}}]\n"
    )
    env = {**GVISOR_ENV, "SANDBOX_SELFCHECK_CACHE_DIR": str(tmp_path), "SANDBOX_STDLIB_ALLOW": "*"}
    done = sandbox_runner("exec", "-", stdin=code, env=env)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"fromThread": 45}}]
    isolation = document["audit"]["isolation"]
    assert isolation["backend"] == "oci"
    assert isolation["runtime"].startswith("runsc")
    in_force = isolation["guarantees"]["inForce"]
    required = load_bundle(POLICIES).config.selfcheck.required
    assert {name: in_force[name] for name in required} == dict.fromkeys(required, "pass")
