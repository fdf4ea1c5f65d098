"""Helpers shared by the test folders (``from helpers import ...``; pytest puts ``tests/``
on ``sys.path``, see ``pythonpath`` in pyproject.toml).

Owns what more than one test module needs and no test double: the command line run as
a user runs it (:func:`sandbox_runner`, in an environment free of the developer's own
``N8N_*``/``SANDBOX_*`` settings: :func:`runner_free_env`), the containers a runner id
owns on Docker (:func:`owned`), our containers on either engine
(:func:`engine_containers`) and what is left of them (:func:`remains`), one sample of
Prometheus' text format (:func:`sample`), a file tree written from a mapping
(:func:`write_tree`), a free local port, a bounded wait for a condition in real
time (:func:`until`), and the policy bundle with numpy and pandas in its image
(:func:`packages_bundle`).

The unit tests' doubles stay in ``tests/unit/fakes.py``, the integration tests'
fixtures and processes in ``tests/integration/conftest.py`` and ``harness.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.sandbox.labels import LABEL_MANAGED, LABEL_OWNER
from runner.sandbox.oci import cgroups
from runner.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:
    import docker

# The packages the tests' second bundle asks for, and its committed lock (written by
# `sandbox-runner image lock` for them; refresh it the same way).
TEST_PACKAGES = ("numpy==2.*", "pandas")
TEST_PACKAGES_LOCK = PROJECT_ROOT / "tests" / "fixtures" / "python-packages.lock"
# What task code must be allowed to import to use pandas: pandas loads dateutil's
# submodules through importlib, which the allowlist checks too.
PANDAS_EXTERNAL_ALLOW = "numpy,pandas,dateutil"

# The prefixes of the runner's settings in the environment (and of n8n's aliases).
SETTINGS_PREFIXES = ("N8N_", "SANDBOX_")
# Each test's own broker task store is given in it (tests/conftest.py).
STORE_VARIABLE = "SANDBOX_BROKER_STORE"


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


# -- containers on either engine -------------------------------------------------------
#
# Read from each engine's own records, not asked of a sandbox (whose answer is what is
# under test): Docker's containers by their labels; the OCI backend's by the files it
# keeps on the host: a bundle per container (``<state dir>/bundles/<id>``, the labels
# in its ``record.json``), the runtime's state (``<state dir>/runtime-<kind>/``), and
# a cgroup per container (``sandbox-runner/<runner id>/<id>`` in every hierarchy).

LabelFilter = Mapping[str, str | None]  # a label's value, or None: the label is there


def oci_state_dir() -> Path:
    """The OCI backend's state directory of the commands and of the test pipelines."""
    from runner.cli.wiring import state_dir

    return state_dir(Settings())


def _docker_containers(client: docker.DockerClient, wanted: LabelFilter) -> dict[str, Any]:
    filters = [name if value is None else f"{name}={value}" for name, value in wanted.items()]
    return {
        str(c["Id"]): dict(c.get("Labels") or {})
        for c in client.api.containers(all=True, filters={"label": filters})
    }


def _oci_bundles(state_dir: Path, wanted: LabelFilter) -> dict[str, dict[str, str]]:
    """The bundles under the state directory whose recorded labels match: id -> labels."""
    found: dict[str, dict[str, str]] = {}
    bundles = state_dir / "bundles"
    if not bundles.is_dir():
        return found
    for bundle in bundles.iterdir():
        try:
            record = json.loads((bundle / "record.json").read_text())
        except (OSError, ValueError):
            record = {}
        labels = record.get("labels") if isinstance(record, dict) else None
        labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
        if all(
            name in labels if value is None else labels.get(name) == value
            for name, value in wanted.items()
        ):
            found[bundle.name] = labels
    return found


def _cgroup_dirs(container_id: str) -> list[Path]:
    """The container's cgroups, under any runner id, in any hierarchy (v1 or v2)."""
    root = cgroups.ROOT
    return sorted(
        {
            *root.glob(f"{cgroups.PARENT}/*/{container_id}"),
            *root.glob(f"*/{cgroups.PARENT}/*/{container_id}"),
        }
    )


def _runtime_states(state_dir: Path, container_id: str) -> list[Path]:
    """The container's entries in any runtime's state root (runc, crun: ``<id>/``;
    runsc: files named after the sandbox and container ids)."""
    return sorted(
        entry
        for root in state_dir.glob("runtime-*")
        for entry in root.iterdir()
        if container_id in entry.name
    )


def engine_containers(
    client: docker.DockerClient | None,
    labels: LabelFilter | None = None,
    *,
    state_dir: Path | None = None,
) -> dict[str, dict[str, str]]:
    """Our containers on both engines whose labels match ``labels``: id -> labels
    (Docker's containers, running or not; the OCI backend's bundles). ``client``
    None: the OCI backend's only."""
    wanted = {LABEL_MANAGED: "true", **(labels or {})}
    return {
        **(_docker_containers(client, wanted) if client else {}),
        **_oci_bundles(state_dir or oci_state_dir(), wanted),
    }


def remains(
    client: docker.DockerClient | None,
    *,
    container_id: str | None = None,
    labels: LabelFilter | None = None,
    state_dir: Path | None = None,
) -> list[str]:
    """Everything left on either engine of one container (``container_id``) or of the
    containers with these ``labels`` (a task's, a runner's): a Docker container; a
    bundle, a runtime state or a cgroup of the OCI backend. Empty: nothing is left.
    ``client`` None: the OCI backend's remains only."""
    assert container_id or labels, "remains of what?"
    state = state_dir or oci_state_dir()
    left: set[str] = set()
    oci_ids: set[str] = set()
    if container_id:
        oci_ids.add(container_id)
        if client and client.api.containers(all=True, filters={"id": container_id}):
            left.add(f"docker container {container_id}")
    if labels:
        wanted = {LABEL_MANAGED: "true", **labels}
        if client:
            left.update(f"docker container {c}" for c in _docker_containers(client, wanted))
        oci_ids.update(_oci_bundles(state, wanted))
        if set(labels) == {LABEL_OWNER}:
            # A runner's: a cgroup that outlived its bundle is found under its parent.
            owner = cgroups.path_of(str(labels[LABEL_OWNER]), "").strip("/").split("/")[-1]
            for pattern in (f"{cgroups.PARENT}/{owner}/*", f"*/{cgroups.PARENT}/{owner}/*"):
                oci_ids.update(p.name for p in cgroups.ROOT.glob(pattern) if p.is_dir())
    for found in oci_ids:
        bundle = state / "bundles" / found
        if bundle.exists():
            left.add(f"oci bundle {bundle}")
        left.update(f"oci runtime state {path}" for path in _runtime_states(state, found))
        left.update(f"cgroup {path}" for path in _cgroup_dirs(found))
    return sorted(left)


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


def packages_bundle(dest: Path) -> Path:
    """``policies/`` copied to ``dest`` with :data:`TEST_PACKAGES` in ``[image]`` and their
    lock: the default bundle but for the packages its image holds."""
    shutil.copytree(PROJECT_ROOT / "policies", dest)
    toml = dest / "sandbox.toml"
    text = toml.read_text(encoding="utf-8")
    asked = "python_packages = [" + ", ".join(f'"{p}"' for p in TEST_PACKAGES) + "]"
    assert text.count("\npython_packages = []\n") == 1, "policies/sandbox.toml changed shape"
    toml.write_text(text.replace("\npython_packages = []\n", f"\n{asked}\n"), encoding="utf-8")
    shutil.copyfile(TEST_PACKAGES_LOCK, dest / TEST_PACKAGES_LOCK.name)
    return dest


def variant_bundle(dest: Path, source: Path, variant: str, tenants: Mapping[str, str]) -> Path:
    """``source`` (a bundle) copied to ``dest`` with ``[image.variants.<variant>]``
    asking for :data:`TEST_PACKAGES` and their committed lock as the variant's;
    ``tenants``: profile name -> its TOML text, written to ``tenants/``. The default
    image stays the standard library's."""
    shutil.copytree(source, dest)
    asked = ", ".join(f'"{p}"' for p in TEST_PACKAGES)
    with (dest / "sandbox.toml").open("a", encoding="utf-8") as toml:
        toml.write(f"\n[image.variants.{variant}]\npython_packages = [{asked}]\n")
    shutil.copyfile(TEST_PACKAGES_LOCK, dest / f"python-packages.{variant}.lock")
    (dest / "tenants").mkdir(exist_ok=True)
    for name, text in tenants.items():
        (dest / "tenants" / f"{name}.toml").write_text(text, encoding="utf-8")
    return dest


def preload_bundle(
    dest: Path,
    preload: tuple[str, ...] = ("pandas",),
    external_allow: str = PANDAS_EXTERNAL_ALLOW,
    tenants: dict[str, str] | None = None,
) -> Path:
    """:func:`packages_bundle` whose ``[imports] external_allow`` is ``external_allow``
    (comma-separated) and whose ``[image] preload`` is ``preload``; ``tenants``: profile
    name -> its TOML text, written to ``tenants/``."""
    packages_bundle(dest)
    toml = dest / "sandbox.toml"
    text = toml.read_text(encoding="utf-8")
    allow = ", ".join(f'"{name}"' for name in external_allow.split(",") if name)
    assert text.count("\nexternal_allow = []\n") == 1, "policies/sandbox.toml changed shape"
    text = text.replace("\nexternal_allow = []\n", f"\nexternal_allow = [{allow}]\n")
    asked = "\npython_packages = ["
    assert text.count(asked) == 1
    names = ", ".join(f'"{name}"' for name in preload)
    text = text.replace(asked, f"\npreload = [{names}]{asked}")
    toml.write_text(text, encoding="utf-8")
    for name, profile in (tenants or {}).items():
        (dest / "tenants").mkdir(exist_ok=True)
        (dest / "tenants" / f"{name}.toml").write_text(profile, encoding="utf-8")
    return dest


def nested_list(depth: int) -> list[Any]:
    """``[[[...]]]``, ``depth`` lists deep (what depth limits are tested with)."""
    outer: list[Any] = []
    inner = outer
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return outer


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
