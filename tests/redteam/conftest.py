"""The red-team suite runs against the real Docker engine, like tests/integration.

Everything here is marked ``docker``; the fixtures come from
``tests/integration/conftest.py`` (the same task image, client and settings).

The probes hard-code x86_64 system call numbers: on any other machine the suite
stops at collection with that message (it never skips).
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from integration.conftest import base_settings, docker_client, pipeline_factory, task_image

HERE = Path(__file__).parent

__all__ = ["base_settings", "docker_client", "pipeline_factory", "task_image"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in ours:
        item.add_marker(pytest.mark.docker)
    if ours and platform.machine() != "x86_64":
        pytest.exit(
            "tests/redteam: the probes call x86_64 system call numbers (272 unshare, 425 "
            f"io_uring_setup, 248 add_key...); this machine is {platform.machine()!r}. "
            "Run the red-team suite on an x86_64 host.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
