"""``[image] preload``: what ``policy lint`` says of it, what a runner makes of it, and the
agent's side (issue 14, item 4).

The bundles are the default one with the tests' packages and their lock
(:func:`helpers.preload_bundle`); the integration side (a warm slot that preloaded
pandas, a tenant that may not have it) is ``tests/integration/test_preload.py``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import TEST_PACKAGES_LOCK, preload_bundle

from runner.cli.wiring import pool_config
from runner.policy import lint_bundle, load_bundle, parse_bundle, resolve_policy
from runner.sandbox.base import GuardConfig, Limits, Mode, TaskSpec
from runner.sandbox.container import allows_import
from runner.sandbox.envelope import decode_result, encode_task
from runner.sandbox.packages import parse_lock
from runner.settings import Settings

NARROW_TENANT = 'version = 1\n\n[imports]\nexternal_allow = ["numpy"]\n'


def findings(bundle: Path) -> list[dict[str, str]]:
    """What ``policy lint`` finds of the bundle's preload."""
    return [f for f in lint_bundle(bundle).as_json()["findings"] if "preload" in f["rule"]]


# -- policy lint --------------------------------------------------------------------------


def test_a_preload_the_lock_provides_and_the_allowlist_allows_is_clean(tmp_path: Path) -> None:
    bundle_dir = preload_bundle(tmp_path / "policies", preload=("pandas", "numpy"))
    report = lint_bundle(bundle_dir)
    assert report.is_ok, report.as_json()
    assert findings(bundle_dir) == []
    bundle = load_bundle(bundle_dir)
    assert bundle.config.image.preload == ("pandas", "numpy")


def test_the_bundle_reads_the_same_modules_from_the_lock_as_the_image_build(
    tmp_path: Path,
) -> None:
    bundle, problems = parse_bundle(preload_bundle(tmp_path / "policies"))
    assert bundle is not None, problems
    lock = parse_lock(TEST_PACKAGES_LOCK.read_text(encoding="utf-8"))
    assert bundle.lock_provides == frozenset(lock.provides)
    assert bundle.lock_provides == {"numpy", "pandas", "dateutil", "tzdata"}


def test_a_preload_no_locked_package_provides_is_an_error(tmp_path: Path) -> None:
    bundle = preload_bundle(
        tmp_path / "policies", preload=("pandas", "scipy"), external_allow="pandas,scipy"
    )
    assert findings(bundle) == [
        {
            "severity": "error",
            "rule": "image.preload-not-locked",
            "file": "sandbox.toml",
            "message": "[image] preload names scipy, which no package of "
            "python-packages.lock provides (a preload is a locked third-party package)",
        }
    ]


def test_a_preload_without_a_lock_is_an_error(tmp_path: Path) -> None:
    bundle = preload_bundle(tmp_path / "policies")
    (bundle / "python-packages.lock").unlink()
    rules = [f["rule"] for f in findings(bundle)]
    assert "image.preload-not-locked" in rules


def test_a_stdlib_module_is_no_preload(tmp_path: Path) -> None:
    # Only locked third-party packages: the standard library is cheap to import, and
    # the rule stays one an auditor reads in the lock.
    bundle = preload_bundle(tmp_path / "policies", preload=("json",))
    assert "image.preload-not-locked" in [f["rule"] for f in findings(bundle)]


def test_a_preload_the_allowlist_refuses_is_an_error(tmp_path: Path) -> None:
    bundle = preload_bundle(tmp_path / "policies", external_allow="numpy,dateutil")
    assert findings(bundle) == [
        {
            "severity": "error",
            "rule": "image.preload-not-allowed",
            "file": "sandbox.toml",
            "message": "[image] preload names pandas, which [imports] external_allow does "
            "not allow: a slot must not hold a module its tasks may not import",
        }
    ]


def test_a_tenant_whose_allowlist_refuses_a_preload_is_warned_of(tmp_path: Path) -> None:
    bundle = preload_bundle(tmp_path / "policies", tenants={"basic": NARROW_TENANT})
    report = lint_bundle(bundle)
    assert report.is_ok  # a warning: the tenant's tasks start cold, nothing is opened
    assert findings(bundle) == [
        {
            "severity": "warning",
            "rule": "tenant.preload-not-allowed",
            "file": "tenants/basic.toml",
            "message": "[imports] external_allow does not allow the preloaded pandas: this "
            "tenant's tasks never take a preloaded warm slot and start cold",
        }
    ]


@pytest.mark.parametrize("name", ["pandas.core", "../x", "--index-url=x", "", "a b"], ids=repr)
def test_a_preload_must_be_a_top_level_module_name(tmp_path: Path, name: str) -> None:
    bundle = preload_bundle(tmp_path / "policies", preload=(name,))
    report = lint_bundle(bundle)
    assert not report.is_ok
    [schema] = [f for f in report.as_json()["findings"] if f["rule"] == "schema"]
    assert schema["message"].startswith("[image] preload.0:"), schema


# -- what a runner makes of it -----------------------------------------------------------


def test_the_runner_preloads_only_what_its_own_allowlist_allows(tmp_path: Path) -> None:
    bundle = load_bundle(preload_bundle(tmp_path / "policies", preload=("pandas", "numpy")))
    wide = resolve_policy(bundle, Settings(policy_dir=bundle.directory))
    assert wide.preload == ("pandas", "numpy")
    assert pool_config(Settings(), wide.preload).preload == ("pandas", "numpy")
    # A setting narrows the allowlist below the bundle's: the slot preloads less.
    narrow = resolve_policy(
        bundle, Settings(policy_dir=bundle.directory, external_allow="numpy,dateutil")
    )
    assert narrow.preload == ("numpy",)


def test_the_default_bundle_preloads_nothing() -> None:
    policy = resolve_policy(load_bundle(Path("policies")), Settings())
    assert policy.preload == ()
    assert pool_config(Settings()).preload == ()


def guards(stdlib: tuple[str, ...] = ("json",), external: tuple[str, ...] = ()) -> GuardConfig:
    return GuardConfig(stdlib_allow=stdlib, external_allow=external, builtins_deny=())


@pytest.mark.parametrize(
    ("allowed", "module", "expected"),
    [
        (guards(external=("pandas",)), "pandas", True),
        (guards(external=("numpy",)), "pandas", False),
        (guards(external=("*",)), "pandas", True),
        (guards(external=()), "pandas", False),
        (guards(stdlib=("json",), external=("*",)), "json", True),
        (guards(stdlib=("re",), external=("*",)), "json", False),  # stdlib by its own list
    ],
)
def test_the_hand_over_rule_reads_the_allowlist_as_the_analyzer_does(
    allowed: GuardConfig, module: str, expected: bool
) -> None:
    from runner.analyzer import ImportPolicy, import_error

    policy = ImportPolicy(frozenset(allowed.stdlib_allow), frozenset(allowed.external_allow))
    assert allows_import(allowed, module) is expected
    assert (import_error(module, policy) is None) is expected


# -- the agent --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(agent_pkg: ModuleType) -> Any:
    import sandbox_agent.agent as module  # staged by the agent_pkg fixture

    return module


def test_the_agent_preloads_what_it_is_told_and_skips_what_fails(agent: Any) -> None:
    assert agent.preload(["--own-pid-namespace"]) is None
    try:
        loaded, took_ms = agent.preload(["--preload=json,no_such_module_here,not-a-name"])
        assert gc.get_freeze_count() > 0  # what the agent holds, out of the child's GC
    finally:
        gc.unfreeze()  # this is the test process, not an agent
    assert loaded == ["json"]
    assert took_ms >= 0
    assert "json" in sys.modules


def test_the_agent_names_the_preloads_a_task_may_not_import(agent: Any) -> None:
    task = {"guards": {"stdlibAllow": ["re"], "externalAllow": ["numpy"]}}
    assert agent.preload_refused(task, ["json", "numpy", "pandas"]) == ["json", "pandas"]
    assert agent.preload_refused(task, ["numpy"]) == []


def run_agent(agent_path: Path, argv: list[str], spec: TaskSpec) -> Any:
    completed = subprocess.run(
        [sys.executable, "-I", "-B", "-c", _ENTRY, str(agent_path), *argv],
        input=encode_task(spec, Limits(timeout_s=10)),
        capture_output=True,
        timeout=30,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return decode_result(completed.stdout), completed.stderr.decode()


_ENTRY = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from sandbox_agent.agent import main; sys.exit(main(sys.argv[1:]))"
)


def spec(code: str, stdlib: tuple[str, ...], external: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(
        task_id="t-preload",
        code=code,
        mode=Mode.ALL_ITEMS,
        items=[],
        guards=GuardConfig(stdlib_allow=stdlib, external_allow=external, builtins_deny=()),
    )


def test_the_agent_reports_its_preload_and_the_child_inherits_it(agent_path: Path) -> None:
    code = "import sys\nreturn [{'json': {'loaded': 'json' in sys.modules}}]"
    envelope, _ = run_agent(agent_path, ["--preload=json"], spec(code, ("sys", "json")))
    assert envelope.status == "success", envelope
    assert envelope.result == [{"json": {"loaded": True}}]
    assert envelope.stats.preloaded == ["json"]
    assert envelope.stats.preload_ms is not None


def test_the_agent_refuses_a_task_that_may_not_import_a_preloaded_module(
    agent_path: Path,
) -> None:
    # Fail closed: the runner never hands such a task a preloaded slot; if it did, the
    # agent runs nothing rather than fork a child of a process that imported json.
    envelope, _ = run_agent(agent_path, ["--preload=json"], spec("return []", ("re",)))
    assert envelope.status == "error"
    assert envelope.error is not None
    assert envelope.error.source == "agent"
    assert envelope.error.message == (
        "This container preloaded json, which the task's allowlist does not allow; "
        "the task was not run"
    )
    assert envelope.stats.child_exit_code is None  # no child was forked


def test_what_a_preload_prints_never_reaches_the_result_channel(
    agent_path: Path, tmp_path: Path
) -> None:
    # A module that writes to stdout while it is imported (fd 1 is the result channel).
    noisy = tmp_path / "noisy_module.py"
    noisy.write_text("print('hello from an import')\n", encoding="utf-8")
    entry = f"import sys; sys.path.append({str(tmp_path)!r}); " + _ENTRY
    completed = subprocess.run(
        [sys.executable, "-I", "-B", "-c", entry, str(agent_path), "--preload=noisy_module"],
        input=encode_task(spec("return [1]", (), ("noisy_module",)), Limits(timeout_s=10)),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    envelope = decode_result(completed.stdout)
    assert envelope.status == "success"
    assert envelope.stats.preloaded == ["noisy_module"]
    assert "hello from an import" in completed.stderr.decode()
    assert json.dumps(envelope.result) == "[1]"
