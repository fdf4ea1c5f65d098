"""The short soak (100 tasks) in the test suite: the same invariants as `make soak`.

It runs ``python -m bench.soak`` exactly as ``make soak`` does (embedded broker, one
``sandbox-runner serve`` process, concurrency 4, a fixed mix of succeeding, raising,
timing-out and memory-bombing tasks) and reads its JSON report.

Its runner runs on this host's default engine (``SANDBOX_BACKEND=auto``: the soak
gives it no other); the report counts leaked containers on Docker only, so what the
OCI backend leaves (bundles, runtime states, cgroups) is checked here, after the soak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import engine_containers, remains

from runner.sandbox.labels import LABEL_OWNER, LABEL_PROCESS, is_alive_identity
from runner.sandbox.oci import cgroups

ROOT = Path(__file__).resolve().parents[2]
TASKS = 100

pytestmark = pytest.mark.usefixtures("task_image")


def soak_runner_ids() -> set[str]:
    """The runner ids of soaks the OCI backend has seen on this host: a runner id's
    cgroup parent stays after its containers, and each soak has an id of its own."""
    parents = [
        *cgroups.ROOT.glob(f"{cgroups.PARENT}/soak-*"),
        *cgroups.ROOT.glob(f"*/{cgroups.PARENT}/soak-*"),
    ]
    return {parent.name for parent in parents if parent.is_dir()}


def is_running_elsewhere(owner: str) -> bool:
    """Does a live process own containers of this runner id (another soak, running)?"""
    labels = engine_containers(None, {LABEL_OWNER: owner})
    return any(is_alive_identity(found.get(LABEL_PROCESS, "")) for found in labels.values())


def test_a_short_soak_loses_duplicates_and_leaks_nothing(tmp_path: Path) -> None:
    before = soak_runner_ids()
    out = tmp_path / "soak.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--tasks", str(TASKS), "--quiet", "--json-out", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.exists(), completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    assert report["tasks"] == TASKS
    assert report["lost"] == 0, report["details"]
    assert report["duplicated"] == 0, report["details"]
    assert report["leakedContainers"] == 0, report["details"]
    # Counted before the runner stopped (beyond its idle pool slots) and after.
    assert report["leakedDuringRun"] == 0, report["details"]
    assert report["leakedAfterStop"] == 0, report["details"]
    assert report["unexpectedOutcomes"] == 0, report["details"]
    # The fixed rotation: of every 10 tasks 6 succeed, 2 raise, 1 times out, 1 bombs.
    assert report["outcomes"] == {
        "ok": {"success": 60},
        "raise": {"user_error": 20},
        "timeout": {"timeout": 10},
        "memory": {"memory_limit_exceeded": 10},
    }
    assert report["runnerExitCode"] == 0
    rss = report["runnerRssMiB"]
    assert rss["start"] > 0
    assert rss["end"] > 0
    latency = report["latencyMs"]["all"]
    assert 0 < latency["p50"] <= latency["p95"]
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The five figures `make soak` promises, each on its own line, then the verdict.
    lines = [line.strip() for line in completed.stdout.splitlines()]
    assert "lost:                0" in lines, completed.stdout
    assert "duplicated:          0" in lines, completed.stdout
    assert (
        "containers leaked:   0 (0 during run, beyond 2 idle pool slots; 0 after stop)" in lines
    ), completed.stdout
    rss_line = f"runner RSS:          {rss['start']:.1f} MiB at start, {rss['end']:.1f} MiB at end"
    assert rss_line in lines, completed.stdout
    latency_line = f"latency:             p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms"
    assert latency_line in lines, completed.stdout
    assert lines[-1] == "soak: OK", completed.stdout
    # What the OCI backend's runner left, if this soak ran on it: nothing.
    for owner in soak_runner_ids() - before:
        if not is_running_elsewhere(owner):
            assert remains(None, labels={LABEL_OWNER: owner}) == [], owner
