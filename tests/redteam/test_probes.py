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
The run is written to ``last_run.json`` for ``scripts/redteam_report.py``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from dataclasses import dataclass

import docker
import pytest
from integration.conftest import pipeline_factory

from runner.settings import Settings

from .catalog import CLASSES, LAST_RUN, THREATS, Probe, load_catalog
from .harness import (
    CANARY_NAME,
    CANARY_PREFIX,
    TOKEN_PREFIX,
    Secrets,
    SuiteRun,
    record,
    run_suite,
)
from .report import SECURITY_DOC, load_record, table_rows

# The whole batch runs in the fixture of the first test: about three minutes.
pytestmark = pytest.mark.timeout(900)

PROBES = load_catalog()
CASES = [(probe, mode) for probe in PROBES for mode in probe.modes]


@dataclass
class Suite:
    run: SuiteRun
    secrets: Secrets
    runner_id: str
    environment_had_secrets: bool


@pytest.fixture(scope="module")
def suite(base_settings: Settings, task_image: str, docker_client: docker.DockerClient) -> Suite:
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
                pipeline_factory(base_settings, task_image),
                PROBES,
                settings=base_settings,
                client=docker_client,
                secrets=found,
                runner_id=runner_id,
            )
        )
        had = os.environ.get(CANARY_NAME) == found.canary
    record(run, PROBES, found, docker_client)
    return Suite(run, found, runner_id, had)


@pytest.mark.parametrize(
    ("probe", "mode"), CASES, ids=[f"{probe.id}[{mode}]" for probe, mode in CASES]
)
def test_probe(suite: Suite, probe: Probe, mode: str) -> None:
    observed = suite.run.observations[probe.id][mode]
    problems = probe.expects[mode].mismatches(observed)
    assert not problems, f"{probe.id} [{mode}] ({probe.title}): " + "; ".join(problems)


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


def test_the_cross_task_listeners_lived_through_the_batch(suite: Suite) -> None:
    # What the listener's set-up achieves, run once to its end in each isolation:
    # SysV shared memory only exists under Docker's profile (in its own IPC
    # namespace), the keyring is refused by both profiles.
    assert {name: obs["result"] for name, obs in suite.run.listener_setup.items()} == {
        "ours": {"bound": True, "file": True, "shm": "refused", "key": "refused"},
        "docker": {"bound": True, "file": True, "shm": "created", "key": "refused"},
    }
    # Cancelled at the end, so they were alive while the cross-task probes ran.
    assert {name: obs["outcome"] for name, obs in suite.run.listeners.items()} == {
        "ours": "cancelled",
        "docker": "cancelled",
    }


def test_the_runner_keeps_serving_after_the_batch(suite: Suite) -> None:
    for mode, observed in suite.run.serving.items():
        assert observed["outcome"] == "success", (mode, observed)
        assert observed["result"] == [{"json": {"n": 3}}], mode


def test_no_container_of_this_runner_is_left(
    suite: Suite, docker_client: docker.DockerClient
) -> None:
    assert suite.run.leftovers == []
    left = docker_client.api.containers(
        all=True, filters={"label": f"io.sandbox-runner.owner={suite.runner_id}"}
    )
    assert left == []


def test_docs_security_shows_the_outcomes_of_this_run(suite: Suite) -> None:
    """The generated table of docs/security.md has exactly the rows this run observed."""
    text = SECURITY_DOC.read_text(encoding="utf-8")
    stale = [row for row in table_rows(load_record(LAST_RUN), PROBES) if row not in text]
    assert not stale, (
        f"{len(stale)} rows of docs/security.md differ from this run: "
        "run .venv/bin/python scripts/redteam_report.py\n" + "\n".join(stale[:5])
    )
