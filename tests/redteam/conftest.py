"""The red-team suite runs against the real Docker engine, like tests/integration.

Everything here is marked ``docker``; the fixtures come from
``tests/integration/conftest.py`` (the same task image, client and settings).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from integration.conftest import base_settings, docker_client, pipeline_factory, task_image

HERE = Path(__file__).parent

__all__ = ["base_settings", "docker_client", "pipeline_factory", "task_image"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.docker)
