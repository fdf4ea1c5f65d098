"""``make soak``'s verdict without Docker: which reports fail the run, and what it prints.

``bench.soak.main`` is run with its ``soak`` coroutine replaced by one that returns a
report built here, so the exit code and the summary are those of the real ``main``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``bench`` is a folder of the checkout, not installed
    sys.path.insert(0, str(ROOT))

from bench import soak as soak_module  # noqa: E402
from bench.soak import SoakReport  # noqa: E402

FIVE_FIGURES = ("lost:", "duplicated:", "containers leaked:", "runner RSS:", "latency:")


def clean_report(**changes: Any) -> SoakReport:
    report = SoakReport(
        tasks=10,
        concurrency=4,
        wall_s=3.2,
        lost=[],
        duplicated=[],
        leaked=[],
        unexpected=[],
        rss_start_mib=58.7,
        rss_end_mib=63.7,
        latency_ms={
            "all": {"p50": 732.0, "p95": 2079.0, "max": 2500.0, "mean": 800.0},
            "ok": {"p50": 610.0, "p95": 1239.0, "max": 1300.0, "mean": 650.0},
        },
        outcomes={"ok": {"success": 10}},
        runner_exit_code=0,
    )
    return replace(report, **changes)


def run_main(
    monkeypatch: pytest.MonkeyPatch, report: SoakReport, argv: list[str] | None = None
) -> tuple[int, list[tuple[int, int, dict[str, Any]]]]:
    calls: list[tuple[int, int, dict[str, Any]]] = []

    async def fake_soak(tasks: int, concurrency: int, **kwargs: Any) -> SoakReport:
        calls.append((tasks, concurrency, kwargs))
        return report

    monkeypatch.setattr(soak_module, "soak", fake_soak)
    return soak_module.main(argv if argv is not None else ["--quiet"]), calls


def figure(output: str, name: str) -> str:
    """The rest of the summary line that starts with ``name`` (e.g. ``"lost:"``)."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(name)]
    assert len(lines) == 1, output
    return lines[0].removeprefix(name).strip()


def test_a_clean_report_is_ok_exits_0_and_prints_the_five_figures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = clean_report()
    assert report.is_ok is True
    code, calls = run_main(monkeypatch, report, ["--tasks", "10", "--concurrency", "3", "--quiet"])
    assert code == 0
    assert calls == [(10, 3, {"progress": False, "pool_size": 2})]
    out = capsys.readouterr().out
    assert figure(out, "lost:") == "0"
    assert figure(out, "duplicated:") == "0"
    assert figure(out, "containers leaked:") == (
        "0 (0 during run, beyond 2 idle pool slots; 0 after stop)"
    )
    assert figure(out, "runner RSS:") == "58.7 MiB at start, 63.7 MiB at end"
    assert figure(out, "latency:") == "p50 732 ms, p95 2079 ms"
    assert out.splitlines()[-1] == "soak: OK"


@pytest.mark.parametrize(
    ("changes", "name", "shown"),
    [
        ({"lost": ["task-lost"]}, "lost:", "1"),
        ({"duplicated": ["task-twice"]}, "duplicated:", "1"),
        (
            {"leaked_during_run": ["c0ffee"]},
            "containers leaked:",
            "1 (1 during run, beyond 2 idle pool slots; 0 after stop)",
        ),
        (
            {"leaked": ["c0ffee"]},
            "containers leaked:",
            "1 (0 during run, beyond 2 idle pool slots; 1 after stop)",
        ),
        (
            {"unexpected": [{"index": 3, "taskId": "t3", "kind": "timeout", "code": "success"}]},
            "unexpected outcomes:",
            "1",
        ),
    ],
    ids=["lost", "duplicated", "leaked-during-run", "leaked-after-stop", "unexpected"],
)
def test_one_bad_figure_fails_the_run_with_exit_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    name: str,
    shown: str,
) -> None:
    report = clean_report(**changes)
    assert report.is_ok is False
    code, _ = run_main(monkeypatch, report)
    assert code == 1
    out = capsys.readouterr().out
    assert figure(out, name) == shown
    for other in FIVE_FIGURES:
        figure(out, other)  # all five are printed, exactly once each
    assert out.splitlines()[-1] == "soak: FAILED"


def test_a_runner_that_did_not_exit_0_fails_a_clean_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = clean_report(runner_exit_code=1)
    assert report.is_ok is True  # the figures are clean ...
    code, _ = run_main(monkeypatch, report)
    assert code == 1  # ... but the run is not
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "soak: OK"
    assert captured.err == "soak: the runner exited with 1\n"


def test_the_json_report_counts_both_kinds_of_leak(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    report = clean_report(leaked_during_run=["a1", "a2"], leaked=["b1"], pool_size=3)
    code, calls = run_main(
        monkeypatch, report, ["--quiet", "--pool-size", "3", "--json-out", str(out)]
    )
    assert code == 1
    assert calls[0][2] == {"progress": False, "pool_size": 3}
    written = json.loads(out.read_text())
    assert written["leakedContainers"] == 3
    assert written["leakedDuringRun"] == 2
    assert written["leakedAfterStop"] == 1
    assert written["details"]["leakedDuringRunContainerIds"] == ["a1", "a2"]
    assert written["details"]["leakedContainerIds"] == ["b1"]
    assert (written["lost"], written["duplicated"], written["unexpectedOutcomes"]) == (0, 0, 0)


def test_no_finished_task_still_prints_a_latency_line() -> None:
    report = clean_report(latency_ms={}, lost=["t0"])
    assert figure(report.summary(), "latency:") == "none (no task finished)"
