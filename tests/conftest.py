"""Shared test set-up: everything under tests/integration is marked ``docker``.

The default test command runs both folders: on this project a Docker engine is part
of the test set-up (``make test`` starts one), not an optional extra. A missing
engine fails the Docker tests loudly; nothing is skipped silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.docker)
