"""Unit-test fixtures shared across modules.

``agent_pkg`` stages the in-container agent the way the image build does (the
agent's own files plus ``runner/analyzer/core.py`` copied in as
``sandbox_agent/analyzer_core.py``), puts the staging folder first on
``sys.path`` and imports the package (``sandbox_agent.guards`` and
``sandbox_agent.analyzer_core`` included). Tests that mutate process state
(``harden_process``) must run in a subprocess with ``PYTHONPATH`` set to the
``agent_path`` fixture.

``clean_env`` takes the developer's own runner settings (``N8N_*``, ``SANDBOX_*``) out
of the environment for one test, for modules whose tests build ``Settings()`` from it
(all but the test's own broker task store, ``SANDBOX_BROKER_STORE``: tests/conftest.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from helpers import SETTINGS_PREFIXES, STORE_VARIABLE

from runner.sandbox.bundle import stage_agent
from runner.settings import PROJECT_ROOT


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        # Not the test's own broker task store (tests/conftest.py): it is no developer's
        # setting, and without it a broker would use the machine's default file.
        if name.startswith(SETTINGS_PREFIXES) and name != STORE_VARIABLE:
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def agent_pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    staging = tmp_path_factory.mktemp("agent")
    stage_agent(PROJECT_ROOT / "sandbox_image", staging)
    stale = [name for name in sys.modules if name.partition(".")[0] == "sandbox_agent"]
    for name in stale:
        del sys.modules[name]
    sys.path.insert(0, str(staging))
    try:
        package = importlib.import_module("sandbox_agent")
        importlib.import_module("sandbox_agent.analyzer_core")
        importlib.import_module("sandbox_agent.guards")
        yield package
    finally:
        sys.path.remove(str(staging))


@pytest.fixture(scope="session")
def agent_path(agent_pkg: ModuleType) -> Path:
    """The staging folder: what to put on ``PYTHONPATH`` to import ``sandbox_agent``."""
    assert agent_pkg.__file__ is not None
    return Path(agent_pkg.__file__).resolve().parent.parent
