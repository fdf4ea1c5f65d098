"""The red-team escape suite: every probe of the catalog, in every mode it names.

One module-scoped run (``harness.run_suite``) sends every probe through the real
pipeline against the real Docker engine: with the default policy, with every
in-process guard off, and (kernel-and-container probes) with our seccomp profile
swapped for Docker's default. Each test below then checks one probe in one mode
against the expectation in the probe's header, exactly: one outcome per mode.

Around the probes: a random canary secret and the broker's tokens sit in this
process's environment and the runner's settings the whole time, and must appear
in no task's output and no container's configuration; the runner must keep
serving after the batch; and no container of this run's runner id may be left.

The run is recorded in this session's temporary directory (and, with
``REDTEAM_RECORD=1``, in the tracked ``last_run.json`` for
``scripts/redteam_report.py``); docs/security.md must be what the tracked record
renders, and this run must have observed the same outcomes as that record (never
compared: the host line, kernel build and Docker version).

Some outcomes depend on the host (a vsock device, AF_ALG, /proc/kcore, the
io_uring sysctl): the catalog keys those expectations on facts detected here
(``catalog.detect_host_facts``), and refuses a machine other than x86_64, whose
system call numbers the probes hard-code. A run whose expectation was never
established for this host's facts still runs and is recorded, is not judged, and
is listed with the reason at the end of the pytest run (tests/redteam/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from integration.conftest import pipeline_factory

from runner.cli.wiring import oci_runtime, state_dir
from runner.settings import PROJECT_ROOT, Settings

from .catalog import (
    CLASSES,
    ENGINE_RUNTIME,
    ENGINES,
    THREATS,
    CatalogError,
    Probe,
    detect_host_facts,
    last_run,
    load_catalog,
    machine_problem,
    unjudged_runs,
)
from .harness import (
    CANARY_NAME,
    CANARY_PREFIX,
    TOKEN_PREFIX,
    DockerEngine,
    Engine,
    OciEngine,
    PipelineFactory,
    Secrets,
    SuiteRun,
    record,
    record_paths,
    run_suite,
)
from .report import load_record, outcome_differences, outcomes, record_facts

# The whole batch runs in the fixture of the first test: about three minutes.
pytestmark = pytest.mark.timeout(900)

HOST_FACTS = detect_host_facts()
if machine_problem(HOST_FACTS) is not None:
    pytest.fail(f"tests/redteam: {machine_problem(HOST_FACTS)}", pytrace=False)
# Each engine's facts: this host's, and the runtime under the task.
FACTS = {engine: {**HOST_FACTS, "runtime": ENGINE_RUNTIME[engine]} for engine in ENGINES}
try:
    PROBES_OF = {engine: load_catalog(FACTS[engine]) for engine in ENGINES}
except CatalogError as exc:
    pytest.fail(f"tests/redteam: no expectation for this host: {exc}", pytrace=False)
PROBES = PROBES_OF["docker"]
# Judged here: the runs whose expectation holds for this host's facts, per engine.
CASES = [
    (engine, probe, mode)
    for engine in ENGINES
    for probe in PROBES_OF[engine]
    for mode in probe.expects
]


def each_engine(test: Any) -> Any:
    """Run a test of the suite once per engine (the suite is made once per engine)."""
    return pytest.mark.parametrize("engine", ENGINES)(test)


@dataclass
class Suite:
    engine: str
    run: SuiteRun
    secrets: Secrets
    runner_id: str
    environment_had_secrets: bool
    record: dict[str, Any]


def engine_of(
    name: str, base_settings: Settings, task_image: str, client: docker.DockerClient
) -> tuple[Engine, PipelineFactory]:
    """The engine a suite runs on, and the factory of its pipelines."""
    if name == "docker":
        return DockerEngine(client), pipeline_factory(base_settings, task_image)
    overrides = {"oci_runtime": "runsc"} if name == "gvisor" else {}
    settings = Settings(**{**base_settings.model_dump(), **overrides})
    runtime = oci_runtime(settings)
    if isinstance(runtime, str):
        pytest.fail(f"tests/redteam: the {name} engine cannot run here: {runtime}")
    factory = pipeline_factory(settings, task_image, backend="oci")
    return OciEngine(name, state_dir(settings), runtime), factory


class Suites:
    """One run of the whole batch per engine, made on first use and kept for the module
    (the tests of one engine are collected together, so each engine runs once)."""

    def __init__(
        self,
        base_settings: Settings,
        task_image: str,
        client: docker.DockerClient,
        tmp: pytest.TempPathFactory,
    ) -> None:
        self._args = (base_settings, task_image, client, tmp)
        self._made: dict[str, Suite] = {}

    def of(self, name: str) -> Suite:
        if name not in self._made:
            self._made[name] = make_suite(name, *self._args)
        return self._made[name]


@pytest.fixture(scope="module")
def suites(
    base_settings: Settings,
    task_image: str,
    docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Suites:
    return Suites(base_settings, task_image, docker_client, tmp_path_factory)


@pytest.fixture
def suite(suites: Suites, engine: str) -> Suite:
    return suites.of(engine)


def make_suite(
    name: str,
    base_settings: Settings,
    task_image: str,
    docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Suite:
    engine, factory = engine_of(name, base_settings, task_image, docker_client)
    probes = PROBES_OF[name]
    found = Secrets(
        canary=CANARY_PREFIX + secrets.token_hex(16),
        auth_token=TOKEN_PREFIX + secrets.token_hex(16),
        grant_token=TOKEN_PREFIX + secrets.token_hex(16),
    )
    runner_id = f"redteam-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        # In the runner's own environment before any pipeline is built.
        patch.setenv(CANARY_NAME, found.canary)
        patch.setenv("N8N_RUNNERS_AUTH_TOKEN", found.auth_token)
        patch.setenv("N8N_RUNNERS_GRANT_TOKEN", found.grant_token)
        run = asyncio.run(
            run_suite(
                factory,
                probes,
                settings=base_settings,
                engine=engine,
                secrets=found,
                runner_id=runner_id,
            )
        )
        had = os.environ.get(CANARY_NAME) == found.canary
    recorded = record(
        run,
        probes,
        found,
        docker_client,
        facts=FACTS[name],
        paths=record_paths(tmp_path_factory.mktemp(f"redteam-{name}"), name),
        engine=name,
        runtime=engine.runtime.version() if isinstance(engine, OciEngine) else "runc (Docker)",
    )
    return Suite(name, run, found, runner_id, had, recorded)


@pytest.mark.parametrize(
    ("engine", "probe", "mode"),
    CASES,
    ids=[f"{engine}:{probe.id}[{mode}]" for engine, probe, mode in CASES],
)
def test_probe(suite: Suite, probe: Probe, mode: str) -> None:
    observed = suite.run.observations[probe.id][mode]
    problems = probe.expects[mode].mismatches(observed)
    assert not problems, f"{probe.id} [{mode}] ({probe.title}): " + "; ".join(problems)


@each_engine
def test_runs_not_judged_here_still_ran_and_are_recorded(suite: Suite) -> None:
    """A run this host's facts leave open is not dropped: it ran, and its outcome and
    the reason it is not judged are in the record (the pytest summary lists them)."""
    for probe_id, mode, why in unjudged_runs(PROBES_OF[suite.engine]):
        seen = suite.record["probes"][probe_id]["modes"][mode]
        assert seen["observed"] is not None, (probe_id, mode)
        assert seen["observed"]["outcome"], (probe_id, mode)
        assert (seen["holds"], seen["unjudged"]) == (None, why), (probe_id, mode)


def test_the_catalog_covers_every_threat_with_several_probes() -> None:
    assert len(PROBES) >= 60
    for tag, (_klass, text) in THREATS.items():
        count = sum(1 for probe in PROBES if probe.threat == tag)
        # Lifecycle faults outside a task's code (runner killed, daemon restarted,
        # broker gone) are test_lifecycle.py's and tests/integration/test_faults.py's.
        assert count >= (3 if tag != "res.lifecycle" else 4), f"{tag} ({text}): {count} probes"
    for klass in CLASSES:
        assert sum(1 for probe in PROBES if probe.klass == klass) >= 15, klass
    for probe in PROBES:
        assert set(probe.modes) >= {"default", "guards_off"}, probe.id
        if probe.klass == "kernel":
            assert "ablation" in probe.modes, probe.id


@each_engine
def test_no_secret_reaches_any_task_or_container(suite: Suite) -> None:
    assert suite.environment_had_secrets, "the canary was not in the runner's environment"
    assert suite.run.leaks == []
    # Containers were really inspected while tasks ran (listeners, pool slots, tasks).
    assert sum(i["containers"] for i in suite.run.inspections) >= 4
    for inspection in suite.run.inspections:
        for value in suite.secrets.values():
            assert value not in inspection["text"]
        assert "N8N_RUNNERS" not in inspection["text"]
        assert CANARY_NAME not in inspection["text"]


@each_engine
def test_the_cross_task_listeners_lived_through_the_batch(suite: Suite) -> None:
    # What the listener's set-up achieves, run once to its end in each isolation:
    # SysV shared memory only exists under Docker's profile (in its own IPC
    # namespace), the keyring is refused by both profiles.
    assert {name: obs["result"] for name, obs in suite.run.listener_setup.items()} == {
        "ours": {"bound": True, "file": True, "shm": "refused", "key": "refused"},
        "docker": {"bound": True, "file": True, "shm": "created", "key": "refused"},
    }
    # Ready before any probe ran (polled), and the positive control: from inside each
    # listener's own container, its abstract socket accepts a connection. So the
    # ECONNREFUSED of abstract_socket_peer from another container is isolation, not
    # a listener that was not there.
    for name, control in suite.run.listener_control.items():
        assert control["listener_running"], (name, control)
        assert control["polls"] >= 1, (name, control)
        assert {key: control.get(key) for key in ("ready", "connect")} == {
            "ready": True,
            "connect": "ok",
        }, (name, control)
    assert sorted(suite.run.listener_control) == ["docker", "ours"]
    # Cancelled at the end, so they were alive while the cross-task probes ran.
    assert {name: obs["outcome"] for name, obs in suite.run.listeners.items()} == {
        "ours": "cancelled",
        "docker": "cancelled",
    }


@each_engine
def test_the_runner_keeps_serving_after_the_batch(suite: Suite) -> None:
    for mode, observed in suite.run.serving.items():
        assert observed["outcome"] == "success", (mode, observed)
        assert observed["result"] == [{"json": {"n": 3}}], mode


@each_engine
def test_no_container_of_this_runner_is_left(
    suite: Suite, docker_client: docker.DockerClient
) -> None:
    assert suite.run.leftovers == []
    left = docker_client.api.containers(
        all=True, filters={"label": f"io.sandbox-runner.owner={suite.runner_id}"}
    )
    assert left == []


REGENERATE = (
    "REDTEAM_RECORD=1 .venv/bin/pytest tests/redteam && .venv/bin/python scripts/redteam_report.py"
)


@each_engine
def test_docs_security_shows_the_outcomes_of_this_run(suite: Suite) -> None:
    """docs/security.md shows what the tracked record renders (the next test), and this
    run observed the same outcomes as that record: the same probes and counts, every
    run contained alike, the same cell where the expectation is the same on both hosts.

    Never compared: the host line (kernel build, Docker version, host facts) and the
    stamp (when, how long), so another machine of the same kind passes; a run whose
    expectation differs with the host facts must hold on both.
    """
    tracked_path = last_run(suite.engine)
    tracked = load_record(tracked_path)
    problems = outcome_differences(
        outcomes(suite.record, PROBES_OF[suite.engine]),
        outcomes(tracked, load_catalog(record_facts(tracked))),
    )
    assert not problems, (
        f"this run's outcomes on {suite.engine} differ from those docs/security.md shows "
        f"({tracked_path.name}): run {REGENERATE}\n" + "\n".join(problems[:12])
    )


def test_the_report_script_finds_the_document_current() -> None:
    """``scripts/redteam_report.py --check``: the document is what the tracked record
    (``last_run.json``, the script's source) renders."""
    done = subprocess.run(
        [sys.executable, "scripts/redteam_report.py", "--check"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"docs/security.md is not what tests/redteam/last_run.json renders: run {REGENERATE}\n"
        + done.stdout
        + done.stderr
    )
