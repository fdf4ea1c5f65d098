"""``sandbox-runner policy lint`` and ``policy explain``, as an auditor runs them.

Bad bundles live in ``tests/fixtures/bad_policies/<case>/``: each is a small bundle
that differs from ``tests/fixtures/good_policy/`` in one place, with the rule it must
trip in its ``EXPECTED`` file. A new case is one new folder.

``policy explain`` is pinned by snapshots in ``tests/fixtures/``. After a reviewed
change of the bundle (or of the output), refresh them with::

    UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/unit/test_policy_cli.py    # or: make snapshots

and review the diff of the snapshot files like any other policy change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.cli.selfcheck import render_selfcheck

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BAD = sorted(path for path in (FIXTURES / "bad_policies").iterdir() if path.is_dir())
SNAPSHOT_TEXT = FIXTURES / "policy_explain.txt"
SNAPSHOT_JSON = FIXTURES / "policy_explain.json"


@pytest.fixture(autouse=True)
def in_project_root(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> None:
    # Paths in the output are as given on the command line: relative to the project;
    # settings from the environment are none of the developer's own (clean_env).
    monkeypatch.chdir(ROOT)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_lint_passes_on_the_policies_bundle() -> None:
    code, output = invoke("policy", "lint", "policies", "--arch", "x86_64")
    assert code == 0, output
    first = output.splitlines()[0]
    assert first.startswith("policy lint policies: OK: 0 error(s), 0 warning(s) (sha256 ")
    # The comparison with Docker's default profile, syscall by syscall.
    assert "Compared with Docker's default seccomp profile" in output
    assert "system calls allowed: ours 176, Docker's default 291" in output
    assert "    io_uring_setup         ours: refused (EPERM); Docker: allowed" in output
    assert "allowed only by ours (0): none" in output


def test_lint_defaults_to_the_configured_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_POLICY_DIR", str(FIXTURES / "bad_policies" / "privileged"))
    code, output = invoke("policy", "lint")
    assert code == 1
    assert "[container.privileged]" in output


def test_lint_passes_on_the_minimal_good_bundle() -> None:
    code, output = invoke("policy", "lint", "tests/fixtures/good_policy")
    assert code == 0, output


def test_lint_json_is_one_document() -> None:
    code, output = invoke("policy", "lint", "policies", "--json", "--arch", "x86_64")
    assert code == 0
    document = json.loads(output)
    assert document["ok"] is True
    assert document["errors"] == 0
    diff = document["comparedWithDockerDefault"]
    assert diff["arch"] == "x86_64"
    assert {"syscall": "ptrace", "ours": "refused (EPERM)", "docker": "allowed"} in diff[
        "refusedOnlyByOurs"
    ]
    socket = next(d for d in diff["narrowedByOurs"] if d["syscall"] == "socket")
    assert "arg0 == 0x1" in socket["oursOnlyIf"]


@pytest.mark.parametrize("case", BAD, ids=[path.name for path in BAD])
def test_lint_rejects_each_bad_bundle(case: Path) -> None:
    expected = (case / "EXPECTED").read_text().strip()
    code, output = invoke("policy", "lint", str(case), "--json")
    assert code == 1, output
    document = json.loads(output)
    assert document["ok"] is False
    rules = {f["rule"] for f in document["findings"] if f["severity"] == "error"}
    assert expected in rules, f"{case.name}: expected {expected}, got {sorted(rules)}"
    text_code, text = invoke("policy", "lint", str(case))
    assert text_code == 1
    assert f"[{expected}]" in text
    assert "REJECTED" in text.splitlines()[0]


def test_bad_bundles_cover_the_issue_list() -> None:
    expected = {(case / "EXPECTED").read_text().strip() for case in BAD}
    for rule in (
        "container.privileged",
        "container.cap-add",
        "container.host-network",
        "container.host-pid",
        "container.host-ipc",
        "container.host-mount",
        "container.docker-socket",
        "seccomp.default-allows",
        "limits.above-ceiling",
    ):
        assert rule in expected, rule


def _check_snapshot(path: Path, actual: str) -> None:
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"no snapshot {path.name}: run with UPDATE_SNAPSHOTS=1"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, (
        f"`policy explain` output changed; if the change is intended, run "
        f"UPDATE_SNAPSHOTS=1 .venv/bin/pytest {Path(__file__).relative_to(ROOT)} and review "
        f"the diff of {path.relative_to(ROOT)}"
    )


def test_explain_text_snapshot() -> None:
    code, output = invoke("policy", "explain", "policies")
    assert code == 0
    _check_snapshot(SNAPSHOT_TEXT, output)


def test_explain_json_snapshot() -> None:
    code, output = invoke("policy", "explain", "policies", "--json")
    assert code == 0
    document = json.loads(output)
    assert document["container"]["network"] == "none"
    assert document["seccomp"]["defaultAnswer"] == "EPERM"
    _check_snapshot(SNAPSHOT_JSON, output)


def test_explain_reads_a_bundle_the_linter_rejects() -> None:
    # An auditor may read a rejected bundle; only an unreadable one is an error.
    code, output = invoke("policy", "explain", "tests/fixtures/bad_policies/privileged")
    assert code == 0
    assert "privileged true" in output
    code, output = invoke("policy", "explain", "tests/fixtures/bad_policies/not_toml")
    assert code == 2
    assert "cannot read the policy bundle" in output


def test_selfcheck_rendering_marks_every_guarantee() -> None:
    document = {
        "ok": False,
        "policySha256": "ab" * 32,
        "daemonId": "DAEMON",
        "checkedAt": "2026-01-01T00:00:00.000+00:00",
        "durationMs": 512.0,
        "cached": False,
        "key": "k",
        "guarantees": [
            {"name": "seccomp-filter", "status": "pass", "required": True, "detail": "Seccomp: 2"},
            {
                "name": "seccomp-profile",
                "status": "fail",
                "required": True,
                "detail": "io_uring_setup EFAULT",
            },
            {"name": "apparmor", "status": "not-available", "required": False, "detail": "none"},
        ],
    }
    text = render_selfcheck(document)
    assert "  PASS  seccomp-filter        required   Seccomp: 2" in text
    assert "  FAIL  seccomp-profile       required   io_uring_setup EFAULT" in text
    assert "  N/A   apparmor              optional   none" in text
    assert text.splitlines()[-1] == (
        "result: FAILED: required guarantees not in force: seccomp-profile"
    )
