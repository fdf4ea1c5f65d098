"""The short soak (100 tasks) in the test suite: the same invariants as `make soak`.

It runs ``python -m bench.soak`` exactly as ``make soak`` does (embedded broker, one
``sandbox-runner serve`` process, concurrency 4, a fixed mix of succeeding, raising,
timing-out and memory-bombing tasks) and reads its JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = 100

pytestmark = pytest.mark.usefixtures("task_image")


def test_a_short_soak_loses_duplicates_and_leaks_nothing(tmp_path: Path) -> None:
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
