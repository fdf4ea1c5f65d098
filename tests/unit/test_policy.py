"""The policy bundle: loading, hashing, validation errors, the merge with settings,
and the agreement between ``[container]`` and what the runner really asks Docker for."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import docker
import pytest
from pydantic import ValidationError

from runner.cli.wiring import image_recipe, limits_from
from runner.errors import ConfigurationError
from runner.policy import (
    GUARANTEES,
    MAY_BE_OPTIONAL,
    REQUIRED_REFUSALS,
    PolicyBundle,
    Severity,
    bundle_sha256,
    compare_with_docker,
    docker_default_profile,
    load_bundle,
    load_policy,
    resolve_policy,
)
from runner.sandbox.base import Limits
from runner.sandbox.docker import DockerSandbox
from runner.sandbox.isolation import IsolationConfig
from runner.settings import PROJECT_ROOT, Settings

POLICIES = PROJECT_ROOT / "policies"
FIXTURES = PROJECT_ROOT / "tests" / "fixtures"
MIB = 1024 * 1024


# Settings read from the environment: none of the developer's own (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return load_bundle(POLICIES)


def copy_bundle(tmp_path: Path, source: Path = POLICIES) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    return target


def edit_toml(directory: Path, old: str, new: str) -> None:
    path = directory / "sandbox.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


# -- the bundle in policies/ -------------------------------------------------------------


def test_policies_bundle_loads_without_findings(bundle: PolicyBundle) -> None:
    assert bundle.warnings == ()
    assert bundle.files == ("apparmor/sandbox-task", "sandbox.toml", "seccomp/task.json")
    assert len(bundle.sha256) == 64
    assert bundle.config.image.uid == 10001
    assert bundle.config.container.network_mode == "none"


def test_sha256_covers_every_file_in_a_stable_order(bundle: PolicyBundle, tmp_path: Path) -> None:
    files = [(name, (POLICIES / name).read_bytes()) for name in bundle.files]
    assert bundle_sha256(files) == bundle.sha256
    assert bundle_sha256(reversed(files)) == bundle.sha256  # order of reading is irrelevant
    assert load_bundle(POLICIES).sha256 == bundle.sha256
    for name in bundle.files:
        copy = copy_bundle(tmp_path / name.replace("/", "_"))
        with (copy / name).open("a") as handle:
            handle.write("\n")
        assert load_bundle(copy).sha256 != bundle.sha256, f"{name} is not covered"
    # Reference data and the README are not policy: they do not change the hash.
    copy = copy_bundle(tmp_path / "docs")
    (copy / "README.md").write_text("changed")
    (copy / "reference" / "syscalls.json").write_text("{}")
    assert load_bundle(copy).sha256 == bundle.sha256


def test_policy_objects_are_immutable(bundle: PolicyBundle) -> None:
    with pytest.raises(ValidationError):
        bundle.config.limits.memory_mb.default = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        bundle.config.container.tmpfs["/tmp"] = "rw,exec"  # type: ignore[index]
    assert isinstance(bundle.config.imports.stdlib_allow, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.sha256 = "0" * 64  # type: ignore[misc]
    policy = load_policy(Settings())
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.limits.memory_bytes = 1  # type: ignore[misc]


def test_limits_dataclass_defaults_match_the_bundle(bundle: PolicyBundle) -> None:
    # Limits() keeps defaults for tests and fakes; they must not drift from the policy.
    assert Limits() == bundle.default_limits


def test_every_guarantee_is_listed_and_only_apparmor_is_optional(bundle: PolicyBundle) -> None:
    selfcheck = bundle.config.selfcheck
    assert sorted([*selfcheck.required, *selfcheck.optional]) == sorted(GUARANTEES)
    assert set(selfcheck.optional) == MAY_BE_OPTIONAL == {"apparmor"}


def test_our_profile_refuses_what_docker_allows_and_allows_nothing_docker_refuses(
    bundle: PolicyBundle,
) -> None:
    comparison = compare_with_docker(bundle.seccomp, docker_default_profile(), "x86_64")
    assert comparison.allowed_only_by_ours == ()
    refused = {difference.name for difference in comparison.refused_only_by_ours}
    # The ones Docker's default allows without any capability (policies/README.md 1.6, 1.7).
    assert {"io_uring_setup", "ptrace", "memfd_create", "modify_ldt", "splice"} <= refused
    narrowed = {difference.name for difference in comparison.narrowed_by_ours}
    assert narrowed == {"ioctl", "prctl", "prlimit64", "socket", "socketpair"}
    assert comparison.ours_allowed == 176
    assert comparison.docker_allowed == 291
    assert "chown32" in comparison.docker_names_not_on_arch


def test_required_refusals_are_refused_on_both_architectures(bundle: PolicyBundle) -> None:
    for arch in ("x86_64", "aarch64"):
        verdicts = bundle.seccomp.resolve(arch)
        for name in REQUIRED_REFUSALS:
            verdict = verdicts.get(name) or bundle.seccomp.default_verdict(name)
            assert not verdict.is_allowed, (arch, name)


def test_apparmor_profile_compiles() -> None:
    parser = shutil.which("apparmor_parser") or "/usr/sbin/apparmor_parser"
    if not Path(parser).exists():
        pytest.fail("apparmor_parser is missing: `make setup` installs the apparmor package")
    done = subprocess.run(
        [parser, "-Q", "-K", "-T", str(POLICIES / "apparmor" / "sandbox-task")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- validation errors name the file and the rule -----------------------------------------


@pytest.mark.parametrize(
    ("case", "file", "rule"),
    [
        pytest.param("not_toml", "sandbox.toml", "schema.syntax", id="toml-syntax"),
        pytest.param("unknown_key", "sandbox.toml", "schema", id="unknown-key"),
        pytest.param("wrong_type", "sandbox.toml", "schema", id="wrong-type"),
        pytest.param("seccomp_not_json", "seccomp/task.json", "schema.syntax", id="json-syntax"),
        pytest.param("seccomp_unknown_action", "seccomp/task.json", "schema", id="bad-action"),
        pytest.param("seccomp_missing", "sandbox.toml", "files.missing", id="missing-file"),
        pytest.param("privileged", "sandbox.toml", "container.privileged", id="privileged"),
        pytest.param(
            "seccomp_default_allow", "seccomp/task.json", "seccomp.default-allows", id="allow"
        ),
        pytest.param(
            "apparmor_name_mismatch", "apparmor/sandbox-task", "apparmor.profile-name", id="aa"
        ),
    ],
)
def test_invalid_bundle_stops_with_the_file_and_the_rule(case: str, file: str, rule: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_bundle(FIXTURES / "bad_policies" / case)
    message = str(caught.value)
    assert f": {file}: " in message
    assert f"[{rule}]" in message
    assert "sandbox-runner policy lint" in message


def test_schema_error_names_the_key(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path)
    edit_toml(
        bundle, "pids = { default = 64, ceiling = 512 }", "pids = { default = -1, ceiling = 512 }"
    )
    with pytest.raises(ConfigurationError, match=r"sandbox.toml: \[limits\] pids.default: "):
        load_bundle(bundle)


def test_unlinted_loading_keeps_schema_errors_fatal_and_rules_as_warnings() -> None:
    weak = load_bundle(FIXTURES / "bad_policies" / "seccomp_is_docker_default", enforce=False)
    assert weak.warnings
    assert all(finding.severity is Severity.WARNING for finding in weak.warnings)
    with pytest.raises(ConfigurationError):
        load_bundle(FIXTURES / "bad_policies" / "not_toml", enforce=False)


# -- settings tighten, never loosen beyond the ceilings ---------------------------------


@pytest.mark.parametrize(
    ("field", "variable", "value", "ceiling"),
    [
        ("task_timeout_s", "N8N_RUNNERS_TASK_TIMEOUT", 601, "timeout_s = 600"),
        ("memory_mb", "SANDBOX_MEMORY_MB", 4096, "memory_mb = 2048"),
        ("cpus", "SANDBOX_CPUS", 8, "cpus = 4"),
        ("pids_limit", "SANDBOX_PIDS_LIMIT", 513, "pids = 512"),
        ("tmpfs_mb", "SANDBOX_TMPFS_MB", 257, "tmpfs_mb = 256"),
        ("output_bytes", "SANDBOX_OUTPUT_BYTES", 67108865, "output_bytes = 67108864"),
        ("nofile", "SANDBOX_NOFILE", 4097, "nofile = 4096"),
        ("fsize_mb", "SANDBOX_FSIZE_MB", 257, "fsize_mb = 256"),
        ("nproc", "SANDBOX_NPROC", 65537, "nproc = 65536"),
    ],
)
def test_a_setting_above_its_ceiling_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, field: str, variable: str, value: int, ceiling: str
) -> None:
    monkeypatch.setenv(variable, str(value))
    with pytest.raises(ConfigurationError) as caught:
        load_policy(Settings())
    message = str(caught.value)
    assert message.startswith(f"{variable}={value} is above the policy ceiling")
    assert ceiling in message
    assert "sandbox.toml" in message


def test_settings_may_tighten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_MEMORY_MB", "128")
    monkeypatch.setenv("SANDBOX_PIDS_LIMIT", "32")
    monkeypatch.setenv("N8N_RUNNERS_TASK_TIMEOUT", "5")
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "json")
    policy = load_policy(Settings())
    assert policy.limits.memory_bytes == 128 * MIB
    assert policy.limits.pids == 32
    assert policy.limits.timeout_s == 5
    assert policy.limits.nofile == 256  # untouched: the bundle's default
    assert policy.import_policy.stdlib_allow == frozenset({"json"})
    assert set(policy.tightened) == {"memory_mb", "pids_limit", "task_timeout_s", "stdlib_allow"}


def test_exactly_the_ceiling_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_MEMORY_MB", "2048")
    assert load_policy(Settings()).limits.memory_bytes == 2048 * MIB


def test_timeout_flag_is_held_to_the_ceiling() -> None:
    settings = Settings()
    assert limits_from(settings, timeout_s=600).timeout_s == 600
    with pytest.raises(ConfigurationError, match=r"^--timeout=601 is above the policy ceiling"):
        limits_from(settings, timeout_s=601)


def test_allowlist_beyond_a_finite_ceiling_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(FIXTURES / "good_policy")
    ceilinged = copy_bundle(tmp_path, FIXTURES / "good_policy")
    edit_toml(
        ceilinged, 'stdlib_allow_ceiling = ["*"]', 'stdlib_allow_ceiling = ["json", "math", "re"]'
    )
    pinned = load_bundle(ceilinged)
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "json,os")
    with pytest.raises(ConfigurationError, match="N8N_RUNNERS_STDLIB_ALLOW allows os, beyond"):
        resolve_policy(pinned, Settings())
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "*")
    with pytest.raises(ConfigurationError, match=r"allows \*, beyond the policy's"):
        resolve_policy(pinned, Settings())
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "json")
    assert resolve_policy(pinned, Settings()).import_policy.stdlib_allow == frozenset({"json"})
    # With the ceiling "*" (n8n's semantics), any list is within bounds.
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "*")
    assert resolve_policy(bundle, Settings()).import_policy.stdlib_allow == frozenset({"*"})


def test_builtins_deny_must_keep_the_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    floored = copy_bundle(tmp_path, FIXTURES / "good_policy")
    edit_toml(floored, "builtins_deny_floor = []", 'builtins_deny_floor = ["eval"]')
    bundle = load_bundle(floored)
    monkeypatch.setenv("N8N_RUNNERS_BUILTINS_DENY", "exec,open")
    with pytest.raises(ConfigurationError, match="N8N_RUNNERS_BUILTINS_DENY must still deny eval"):
        resolve_policy(bundle, Settings())
    monkeypatch.setenv("N8N_RUNNERS_BUILTINS_DENY", "eval,exec")
    assert resolve_policy(bundle, Settings()).guards.builtins_deny == ("eval", "exec")


# -- what the runner asks Docker for agrees with [container] ----------------------------


def test_container_configuration_matches_the_policy(bundle: PolicyBundle) -> None:
    """The hard-coded host configuration of DockerSandbox and the bundle cannot drift."""
    policy = load_policy(Settings())
    isolation = IsolationConfig.from_policy(policy, apparmor_available=False)
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    try:
        sandbox = DockerSandbox(client, image="unused", isolation=isolation, runner_id="unit")
        config = sandbox._container_config(policy.limits, labels={})
    finally:
        client.close()
    host = config["HostConfig"]
    c = bundle.config.container
    assert host["NetworkMode"] == c.network_mode
    assert host["ReadonlyRootfs"] is c.read_only_rootfs
    assert host.get("Privileged", False) is c.privileged
    assert host["CapDrop"] == list(c.cap_drop)
    assert host.get("CapAdd") in (None, list(c.cap_add))
    assert host["IpcMode"] == c.ipc_mode
    assert host["CgroupnsMode"] == c.cgroupns
    assert host.get("PidMode", "") in ("", c.pid_mode)
    for key in ("Binds", "Mounts", "Devices"):
        assert not host.get(key), key
    for target, options in c.tmpfs.items():
        assert set(options.split(",")) <= set(host["Tmpfs"][target].split(","))
    assert "no-new-privileges:true" in host["SecurityOpt"]
    seccomp = next(o for o in host["SecurityOpt"] if o.startswith("seccomp="))
    assert json.loads(seccomp.removeprefix("seccomp=")) == json.loads(
        (POLICIES / "seccomp" / "task.json").read_text()
    )
    assert config["User"] == f"{bundle.config.image.uid}:{bundle.config.image.uid}"
    assert host["Memory"] == host["MemorySwap"] == policy.limits.memory_bytes
    assert host["PidsLimit"] == policy.limits.pids


def test_isolation_is_built_from_the_policy_and_reports_its_hash(bundle: PolicyBundle) -> None:
    policy = load_policy(Settings())
    isolation = IsolationConfig.from_policy(policy, apparmor_available=True)
    assert isolation.apparmor_profile == "sandbox-task"
    assert isolation.user == "10001:10001"
    assert isolation.policy_sha256 == bundle.sha256
    assert isolation.seccomp_sha256 == bundle.seccomp_sha256
    assert hash(isolation)  # the warm pool keys its slots on it
    report = isolation.report({"inForce": {"seccomp-filter": "pass"}})
    assert report["policySha256"] == bundle.sha256
    assert report["guarantees"] == {"inForce": {"seccomp-filter": "pass"}}
    assert "not verified" in isolation.report()["guarantees"]
    without = IsolationConfig.from_policy(policy, apparmor_available=False)
    assert without.apparmor_profile is None
    assert not any(opt.startswith("apparmor=") for opt in without.security_opt())


def test_image_recipe_takes_repository_and_uid_from_the_policy(bundle: PolicyBundle) -> None:
    recipe = image_recipe(Settings())
    assert recipe.repository == bundle.config.image.repository
    assert recipe.uid == bundle.config.image.uid
    assert recipe.task_tag("sha256:base").startswith(f"{bundle.config.image.repository}:")
