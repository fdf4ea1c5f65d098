"""The red-team suite runs against the real Docker engine, like tests/integration.

Everything here is marked ``docker``; the fixtures come from
``tests/integration/conftest.py`` (the same task image, client and settings).

The probes hard-code x86_64 system call numbers: on any other machine the suite
stops at collection with that message (it never skips). Runs whose expectation was
never established for this host's facts run unjudged; the end of the pytest output
says how many and why (:func:`pytest_terminal_summary`).
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from integration.conftest import base_settings, docker_client, pipeline_factory, task_image

HERE = Path(__file__).parent
COLLECTED = pytest.StashKey[bool]()

__all__ = ["base_settings", "docker_client", "pipeline_factory", "task_image"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in ours:
        item.add_marker(pytest.mark.docker)
    if ours:
        ours[0].config.stash[COLLECTED] = True
    if ours and platform.machine() != "x86_64":
        pytest.exit(
            "tests/redteam: the probes call x86_64 system call numbers (272 unshare, 425 "
            f"io_uring_setup, 248 add_key...); this machine is {platform.machine()!r}. "
            "Run the red-team suite on an x86_64 host.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Say which probe runs each engine leaves unjudged on this host, and why (never
    silent)."""
    if not config.stash.get(COLLECTED, False) or platform.machine() != "x86_64":
        return
    from .catalog import (
        ENGINE_RUNTIME,
        ENGINES,
        CatalogError,
        detect_host_facts,
        load_catalog,
        unjudged_runs,
    )

    host = detect_host_facts()
    described = ", ".join(f"{key}={value}" for key, value in sorted(host.items()))
    terminalreporter.section("red-team probe runs not judged on this host")
    terminalreporter.write_line(f"host facts: {described}")
    for engine in ENGINES:
        try:
            probes = load_catalog({**host, "runtime": ENGINE_RUNTIME[engine]})
        except CatalogError:
            return  # collection already failed with the message
        runs = unjudged_runs(probes)
        total = sum(len(probe.modes) for probe in probes)
        terminalreporter.write_line(
            f"{engine}: {len(runs)} of {total} probe runs not judged (they ran and are recorded)"
            if runs
            else f"{engine}: all {total} probe runs judged"
        )
        for probe_id, mode, why in runs:
            terminalreporter.write_line(f"  {probe_id} [{mode}]: {why}")
