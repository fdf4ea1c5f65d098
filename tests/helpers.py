"""Helpers shared by the test folders (``from helpers import ...``; pytest puts ``tests/``
on ``sys.path``, see ``pythonpath`` in pyproject.toml).

Owns what more than one test module needs and no test double: the command line run as
a user runs it (:func:`sandbox_runner`, in an environment free of the developer's own
``N8N_*``/``SANDBOX_*`` settings: :func:`runner_free_env`), the containers a runner id
owns (:func:`owned`), one sample of Prometheus' text format (:func:`sample`), a file
tree written from a mapping (:func:`write_tree`), a free local port and a bounded wait
for a condition in real time (:func:`until`).

The unit tests' doubles stay in ``tests/unit/fakes.py``, the integration tests'
fixtures and processes in ``tests/integration/conftest.py`` and ``harness.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.sandbox.labels import LABEL_MANAGED, LABEL_OWNER
from runner.settings import PROJECT_ROOT

if TYPE_CHECKING:
    import docker

# The prefixes of the runner's settings in the environment (and of n8n's aliases).
SETTINGS_PREFIXES = ("N8N_", "SANDBOX_")


def runner_free_env() -> dict[str, str]:
    """This process's environment without any runner setting, so that a developer's own
    ``SANDBOX_*`` or ``N8N_*`` variables cannot change what a test sees."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}


def sandbox_runner(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``sandbox-runner <args>`` as a separate process, from the project root, in
    :func:`runner_free_env` plus ``env``; its output as text, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**runner_free_env(), **(env or {})},
        cwd=PROJECT_ROOT,
        timeout=timeout,
        check=False,
    )


def owned(client: docker.DockerClient, owner: str) -> list[dict[str, Any]]:
    """Every container (running or not) that carries our labels and this owner."""
    found: list[dict[str, Any]] = client.api.containers(
        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
    )
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus' text format: the one named ``name`` with
    exactly these labels (label values as written, escapes kept); None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


def write_tree(root: Path, files: Mapping[str, str | None]) -> Path:
    """Write a file tree under ``root``: relative path -> content (None: a directory)."""
    for relative, content in files.items():
        path = root / relative
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(predicate: Callable[[], Any], timeout_s: float = 20, what: str = "") -> Any:
    """Wait for a condition that real processes or a real event loop make true (real
    time, bounded); returns the predicate's first true value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
