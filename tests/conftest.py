"""Shared test set-up: everything under tests/integration is marked ``docker``.

The default test command runs both folders: on this project a Docker engine is part
of the test set-up (``make test`` starts one), not an optional extra. A missing
engine fails the Docker tests loudly; nothing is skipped silently.

No test's broker touches the default task store (``SANDBOX_BROKER_STORE=sqlite``: the
file in the state directory), which every test would share: one test's leftover tasks
recovered by the next, a broker still running refusing the next one. A broker a test
runs in this process (``running_broker(Settings(...))``) reads the variable from the
environment, so:

- each test sets it to a SQLite file of its own (``broker_store``, made only if a broker
  starts): the default store's code is what runs;
- the whole session sets it to ``memory`` first, for what is built before a test's own
  fixtures run (module-level settings, brokers of module- or session-wide fixtures).

Child processes do not inherit either (``runner.testing``'s processes strip
``SANDBOX_*`` and give each broker a store of its own). A test that sets
``SANDBOX_BROKER_STORE`` itself, or clears the environment (``clean_env``), overrides
both.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import STORE_VARIABLE

from runner.testing import RedisServer

INTEGRATION = Path(__file__).parent / "integration"
_store_numbers = itertools.count(1)
_OUTER_STORE = pytest.StashKey[str | None]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_OUTER_STORE] = os.environ.get(STORE_VARIABLE)
    os.environ[STORE_VARIABLE] = "memory"


def pytest_unconfigure(config: pytest.Config) -> None:
    outer = config.stash.get(_OUTER_STORE, None)
    if outer is None:
        os.environ.pop(STORE_VARIABLE, None)
    else:
        os.environ[STORE_VARIABLE] = outer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(autouse=True)
def broker_store(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite file this test's in-process brokers use (made only if one starts).
    A test that sets ``SANDBOX_BROKER_STORE`` itself (or clears the environment with
    ``clean_env``) overrides it."""
    path = tmp_path_factory.getbasetemp() / "broker-stores" / f"{next(_store_numbers)}.sqlite3"
    monkeypatch.setenv(STORE_VARIABLE, f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (its keys flushed for each test: ``redis_url``)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty Redis, for ``SANDBOX_BROKER_STORE``."""
    redis_server.flush()
    return redis_server.url
