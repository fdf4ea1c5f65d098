"""The runner container's seccomp profile for the OCI backend
(``examples/oci-backend/runner-seccomp.json``, docs/operations.md): Docker's default
profile and exactly the two system calls runc needs that it refuses, kept in step
with ``scripts/runner_seccomp.py`` (the integration test in
tests/integration/test_runner_image.py runs a runner container under it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "runner_seccomp", ROOT / "scripts/runner_seccomp.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _allowed(profile: dict[str, Any]) -> set[str]:
    """Names a rule allows with no argument filter and no capability condition."""
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args") and not rule.get("includes")
        for name in rule["names"]
    }


def test_the_profile_file_is_what_the_script_writes() -> None:
    script = _script()
    assert script.OUTPUT.read_text(encoding="utf-8") == script.render(), (
        "examples/oci-backend/runner-seccomp.json is stale: python scripts/runner_seccomp.py"
    )


def test_it_is_dockers_default_plus_what_runc_needs_and_nothing_else() -> None:
    script = _script()
    docker_default = json.loads(script.DOCKER_DEFAULT.read_text(encoding="utf-8"))
    ours = json.loads(script.OUTPUT.read_text(encoding="utf-8"))
    assert ours["syscalls"][:-1] == docker_default["syscalls"]
    assert {k: v for k, v in ours.items() if k != "syscalls"} == {
        k: v for k, v in docker_default.items() if k != "syscalls"
    }
    assert ours["syscalls"][-1]["names"] == ["keyctl", "pivot_root"]
    assert ours["syscalls"][-1]["action"] == "SCMP_ACT_ALLOW"
    # Each is there because Docker's default refuses it, whatever the capabilities.
    everything_docker_allows = {
        name
        for rule in docker_default["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }
    assert {"keyctl", "pivot_root"}.isdisjoint(everything_docker_allows)
    assert _allowed(ours) - _allowed(docker_default) == {"keyctl", "pivot_root"}
