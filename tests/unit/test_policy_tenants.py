"""Tenant profiles (``tenants/<name>.toml``) as an auditor meets them: lint, explain, diff.

The bundles are in ``tests/fixtures/``: ``tenant_policy/`` (``good_policy/`` with the
profiles of two tenants, ``data`` and ``basic``) and ``tenant_policy_next/`` (the
same after a change under review); the bad profiles are ``bad_policies/tenant_*``,
which ``tests/unit/test_policy_cli.py`` lints with the other bad bundles. The output
of ``policy diff`` between the two bundles is pinned by ``policy_diff.txt`` and
``policy_diff.json`` (refreshed like the explain snapshots: ``make snapshots``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.errors import ConfigurationError
from runner.policy import bundle_sha256, diff_policies, load_bundle, parse_bundle

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TENANTS = FIXTURES / "tenant_policy"
TENANTS_NEXT = FIXTURES / "tenant_policy_next"
BAD = FIXTURES / "bad_policies"
SNAPSHOT_TEXT = FIXTURES / "policy_diff.txt"
SNAPSHOT_JSON = FIXTURES / "policy_diff.json"


@pytest.fixture(autouse=True)
def in_project_root(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> None:
    monkeypatch.chdir(ROOT)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def copy_bundle(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


# -- the bundle and its hashes ----------------------------------------------------------


def test_profiles_are_part_of_the_bundle_and_each_has_its_own_hash() -> None:
    bundle, findings = parse_bundle(TENANTS)
    assert bundle is not None, findings
    assert sorted(bundle.tenants) == ["basic", "data"]
    assert "tenants/data.toml" in bundle.files
    assert "tenants/basic.toml" in bundle.files
    data = bundle.tenants["data"]
    assert data.file == "tenants/data.toml"
    assert data.sha256 == bundle_sha256(
        [("tenants/data.toml", (TENANTS / "tenants" / "data.toml").read_bytes())]
    )
    assert data.config.limits.memory_mb == 1024
    good, _ = parse_bundle(FIXTURES / "good_policy")
    assert good is not None
    assert good.tenants == {}
    # The same sandbox.toml and profiles, but the profiles are hashed too.
    assert bundle.sha256 != good.sha256


def test_changing_one_profile_changes_the_bundle_hash_and_that_profile_hash_only(
    tmp_path: Path,
) -> None:
    before, _ = parse_bundle(TENANTS)
    copy = copy_bundle(TENANTS, tmp_path)
    profile = copy / "tenants" / "data.toml"
    profile.write_text(profile.read_text().replace("memory_mb = 1024", "memory_mb = 1536"))
    after, findings = parse_bundle(copy)
    assert before is not None
    assert after is not None, findings
    assert after.sha256 != before.sha256
    assert after.tenants["data"].sha256 != before.tenants["data"].sha256
    assert after.tenants["basic"].sha256 == before.tenants["basic"].sha256


def test_a_renamed_profile_is_another_profile_with_another_hash(tmp_path: Path) -> None:
    before, _ = parse_bundle(TENANTS)
    copy = copy_bundle(TENANTS, tmp_path)
    (copy / "tenants" / "data.toml").rename(copy / "tenants" / "bigdata.toml")
    after, _ = parse_bundle(copy)
    assert before is not None
    assert after is not None
    assert sorted(after.tenants) == ["basic", "bigdata"]
    assert after.tenants["bigdata"].sha256 != before.tenants["data"].sha256
    assert after.sha256 != before.sha256


def test_a_bundle_without_a_tenants_folder_hashes_as_before() -> None:
    bundle, _ = parse_bundle(FIXTURES / "good_policy")
    assert bundle is not None
    assert not any(name.startswith("tenants/") for name in bundle.files)


# -- lint -------------------------------------------------------------------------------


def test_lint_passes_on_a_bundle_with_profiles_and_lists_their_hashes() -> None:
    code, output = invoke("policy", "lint", str(TENANTS), "--json")
    assert code == 0, output
    document = json.loads(output)
    bundle, _ = parse_bundle(TENANTS)
    assert bundle is not None
    assert document["tenants"] == {
        "basic": bundle.tenants["basic"].sha256,
        "data": bundle.tenants["data"].sha256,
    }


def test_lint_text_names_each_profile_with_its_hash() -> None:
    code, output = invoke("policy", "lint", str(TENANTS))
    assert code == 0, output
    bundle, _ = parse_bundle(TENANTS)
    assert bundle is not None
    lines = output.splitlines()
    assert (
        lines[1] == f"  tenant basic: tenants/basic.toml (sha256 {bundle.tenants['basic'].sha256})"
    )
    assert lines[2] == f"  tenant data: tenants/data.toml (sha256 {bundle.tenants['data'].sha256})"


def lint_errors(case: str) -> list[dict[str, str]]:
    code, output = invoke("policy", "lint", str(BAD / case), "--json")
    assert code == 1, output
    return [f for f in json.loads(output)["findings"] if f["severity"] == "error"]


def test_a_limit_above_the_ceiling_names_the_profile_the_key_and_the_ceiling() -> None:
    [finding] = lint_errors("tenant_limit_above_ceiling")
    assert finding == {
        "severity": "error",
        "rule": "tenant.limit-above-ceiling",
        "file": "tenants/data.toml",
        "message": "[limits] memory_mb = 4096 is above the bundle's ceiling 2048 "
        "([limits] memory_mb.ceiling of sandbox.toml)",
    }


def test_an_allowlist_beyond_its_ceiling_names_the_modules() -> None:
    [finding] = lint_errors("tenant_imports_above_ceiling")
    assert finding["file"] == "tenants/data.toml"
    assert finding["message"] == (
        "[imports] stdlib_allow allows os, beyond the bundle's stdlib_allow_ceiling"
    )


def test_a_profile_cannot_name_what_is_bundle_wide() -> None:
    [finding] = lint_errors("tenant_opens_container")
    assert finding["rule"] == "schema"
    assert finding["file"] == "tenants/data.toml"
    assert finding["message"].startswith("container: Extra inputs are not permitted")


def test_an_unknown_limit_key_is_refused_not_ignored() -> None:
    [finding] = lint_errors("tenant_unknown_key")
    assert finding["file"] == "tenants/data.toml"
    assert finding["message"].startswith("[limits] memory: Extra inputs are not permitted")


@pytest.mark.parametrize("case", ["tenant_bad_name", "tenant_stray_file"])
def test_every_entry_of_the_tenants_folder_must_be_a_profile(case: str) -> None:
    [finding] = lint_errors(case)
    assert finding["rule"] == "tenant.name"
    assert finding["file"].startswith("tenants/")
    assert "not a tenant profile" in finding["message"]


def test_a_bad_profile_stops_the_runner_at_start_with_the_file_and_the_rule() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_bundle(BAD / "tenant_limit_above_ceiling")
    message = str(caught.value)
    assert "tenants/data.toml" in message
    assert "[tenant.limit-above-ceiling]" in message
    assert "memory_mb = 4096" in message


@pytest.mark.parametrize("command", ["up", "serve", "broker"])
def test_no_service_starts_with_a_profile_above_the_ceiling(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The policy is loaded before Docker, a socket or a broker is touched.
    monkeypatch.setenv("SANDBOX_POLICY_DIR", str(BAD / "tenant_limit_above_ceiling"))
    result = CliRunner().invoke(main, [command], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "tenants/data.toml: [limits] memory_mb = 4096 is above the bundle's ceiling" in (
        result.output
    )
    assert "[tenant.limit-above-ceiling]" in result.output


# -- explain --tenant -------------------------------------------------------------------


def test_explain_tenant_shows_its_profile_over_the_defaults() -> None:
    code, output = invoke("policy", "explain", str(TENANTS), "--tenant", "data", "--json")
    assert code == 0, output
    document = json.loads(output)
    bundle, _ = parse_bundle(TENANTS)
    assert bundle is not None
    assert document["tenant"] == {
        "name": "data",
        "profile": "tenants/data.toml",
        "profileSha256": bundle.tenants["data"].sha256,
        "runtime": "standard",
        "imageVariant": None,
        "quota": 8,
        "sets": ["limits.timeout_s", "limits.memory_mb", "imports.stdlib_allow"],
    }
    assert document["limits"]["memory_mb"] == {"default": 1024, "ceiling": 2048, "minimum": 16}
    assert document["limits"]["timeout_s"]["default"] == 120
    assert document["limits"]["cpus"]["default"] == 1.0  # not in the profile: the default
    assert document["imports"]["stdlibAllow"] == ["json", "math", "re", "statistics"]
    assert document["imports"]["externalAllow"] == []


def test_explain_tenant_text_marks_what_the_profile_sets() -> None:
    code, output = invoke("policy", "explain", str(TENANTS), "--tenant", "basic")
    assert code == 0, output
    assert "TENANT basic: profile tenants/basic.toml" in output
    assert "  quota        2 task(s) running at once" in output
    assert "LIMITS per task of tenant basic" in output
    assert "  memory_mb               128         2048 *" in output
    assert "  pids                     64          512\n" in output
    assert "  standard library allowed: json\n" in output


def test_explain_a_tenant_without_a_profile_shows_the_defaults() -> None:
    code, output = invoke("policy", "explain", str(TENANTS), "--tenant", "acme", "--json")
    assert code == 0
    document = json.loads(output)
    assert document["tenant"]["profile"] is None
    assert document["limits"]["memory_mb"]["default"] == 256
    assert document["imports"]["stdlibAllow"] == ["json", "math", "re"]
    code, text = invoke("policy", "explain", str(TENANTS), "--tenant", "acme")
    assert "TENANT acme: no profile (tenants/acme.toml): the defaults" in text


def test_explain_of_the_whole_bundle_lists_the_profiles() -> None:
    code, output = invoke("policy", "explain", str(TENANTS), "--json")
    assert code == 0
    document = json.loads(output)
    assert sorted(document["tenants"]) == ["basic", "data"]
    assert "tenant" not in document
    assert document["limits"]["memory_mb"]["default"] == 256


# -- diff -------------------------------------------------------------------------------


def _check_snapshot(path: Path, actual: str) -> None:
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"no snapshot {path.name}: run with UPDATE_SNAPSHOTS=1"
    assert actual == path.read_text(encoding="utf-8"), (
        f"`policy diff` output changed; if intended, run UPDATE_SNAPSHOTS=1 .venv/bin/pytest "
        f"{Path(__file__).relative_to(ROOT)} and review the diff of {path.relative_to(ROOT)}"
    )


def test_diff_of_two_bundles_lists_every_difference_text_snapshot() -> None:
    code, output = invoke(
        "policy", "diff", "tests/fixtures/tenant_policy", "tests/fixtures/tenant_policy_next"
    )
    assert code == 1, output
    _check_snapshot(SNAPSHOT_TEXT, output)


def test_diff_of_two_bundles_json_snapshot() -> None:
    code, output = invoke(
        "policy",
        "diff",
        "tests/fixtures/tenant_policy",
        "tests/fixtures/tenant_policy_next",
        "--json",
    )
    assert code == 1
    document = json.loads(output)
    assert document["same"] is False
    found = {(d["scope"], d["key"]): d for d in document["differences"]}
    assert found["bundle", "limits.memory_mb.ceiling"] == {
        "scope": "bundle",
        "key": "limits.memory_mb.ceiling",
        "a": 2048,
        "b": 4096,
        "effect": "wider",
    }
    assert found["bundle", "imports.builtins_deny"]["removed"] == ["open"]
    assert found["bundle", "imports.builtins_deny"]["effect"] == "wider"
    for arch in ("x86_64", "aarch64"):
        getrandom = found["bundle", f"seccomp.getrandom ({arch})"]
        assert (getrandom["a"], getrandom["b"], getrandom["effect"]) == (
            "refused (EPERM)",
            "allowed",
            "wider",
        )
    # basic's profile is gone: basic gets the defaults now.
    assert found["tenant basic", "limits.memory_mb"]["b"] == 256
    assert found["tenant basic", "imports.stdlib_allow"]["added"] == ["math", "re"]
    assert found["tenant data", "imports.external_allow"]["added"] == ["pandas"]
    assert found["tenant isolated", "runtime"]["effect"] == "narrower"
    assert ("defaults", "limits.memory_mb") not in found  # the default did not change
    _check_snapshot(SNAPSHOT_JSON, output)


def test_diff_of_two_tenants_of_one_bundle() -> None:
    code, output = invoke(
        "policy", "diff", str(TENANTS), "--tenant", "basic", "--tenant", "data", "--json"
    )
    assert code == 1, output
    document = json.loads(output)
    assert document["a"]["tenant"] == "basic"
    assert document["b"]["profile"] == "tenants/data.toml"
    assert [
        (d["scope"], d["key"], d["a"], d["b"], d["effect"]) for d in document["differences"]
    ] == [
        ("tenant basic -> data", "limits.timeout_s", 60, 120, "wider"),
        ("tenant basic -> data", "limits.memory_mb", 128, 1024, "wider"),
        ("tenant basic -> data", "limits.cpus", 0.5, 1.0, "wider"),
        (
            "tenant basic -> data",
            "imports.stdlib_allow",
            ["json"],
            ["json", "math", "re", "statistics"],
            "wider",
        ),
        ("tenant basic -> data", "quota", 2, 8, "wider"),
    ]


def test_diff_of_one_tenant_across_two_bundles() -> None:
    code, output = invoke("policy", "diff", str(TENANTS), str(TENANTS_NEXT), "--tenant", "data")
    assert code == 1
    assert "[tenant data]" in output
    assert "  wider       limits.memory_mb: 1024 -> 2048" in output
    assert "  wider       imports.external_allow: +pandas" in output
    assert "[tenant basic]" not in output


def test_diff_of_a_policy_with_itself_is_empty_and_exits_0() -> None:
    code, output = invoke("policy", "diff", str(TENANTS), str(TENANTS))
    assert code == 0, output
    assert output.splitlines()[-1] == "no difference in what a task may do"
    code, output = invoke("policy", "diff", str(TENANTS), "--tenant", "nobody", "--tenant", "x")
    assert code == 0  # two tenants without profiles: both get the defaults


def test_diff_sees_a_container_switch_and_a_capability(tmp_path: Path) -> None:
    copy = copy_bundle(FIXTURES / "good_policy", tmp_path)
    toml = copy / "sandbox.toml"
    toml.write_text(
        toml.read_text()
        .replace("privileged = false", "privileged = true")
        .replace("cap_add = []", 'cap_add = ["SYS_ADMIN"]')
    )
    a, _ = parse_bundle(FIXTURES / "good_policy")
    b, _ = parse_bundle(copy)
    assert a is not None
    assert b is not None
    result = diff_policies(a, b)
    assert [(d.key, d.describe(), d.effect.value) for d in result.differences] == [
        ("container.privileged", "false -> true", "wider"),
        ("container.cap_add", "+SYS_ADMIN", "wider"),
    ]


def test_diff_refuses_what_is_not_two_policies() -> None:
    code, output = invoke("policy", "diff", str(TENANTS))
    assert code == 2
    assert "policy diff needs two bundles" in output
    code, output = invoke("policy", "diff", str(TENANTS), "tests/fixtures/bad_policies/not_toml")
    assert code == 2
    assert "cannot read the policy bundle" in output
