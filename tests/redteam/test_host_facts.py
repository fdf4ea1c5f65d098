"""The red-team expectations on other hosts: simulated host facts, and one real change.

The suite must pass on any x86_64 host of the kind it runs on, not only on the
machine its record was made on. What differs between such hosts is captured as
*host facts* (``catalog.HOST_FACTS``: a vsock transport, AF_ALG, /proc/kcore, the
io_uring sysctl, unprivileged user namespaces, the cgroup version) plus what is
never an expectation at all (the kernel build string, the Docker version).

- Simulated hosts (no Docker): for several fact sets, detected from a fake file
  system tree, the catalog loads, the runs it leaves unjudged are exactly those
  whose expectation was never established for those facts (and say why), and a run
  that observes what those facts predict has the same *outcomes* as the tracked
  record, with another kernel string and Docker version, so the docs check passes.
  Negative controls show that the same comparison fails on a real difference.
- A real change (Docker): this host's ``kernel.io_uring_disabled`` sysctl is set to
  1 and then 2 for one probe run each (and restored), and the catalog's expectation
  for each value, derived before, is observed.
- No test reads the kernel string to assert on it: only the harness records it and
  the report prints it.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import write_tree
from integration.conftest import pipeline_factory

from runner.pipeline import TaskRequest
from runner.settings import PROJECT_ROOT, Settings

from .catalog import Expect, Probe, detect_host_facts, load_catalog, unjudged_runs
from .harness import docker_default_isolation
from .report import (
    load_record,
    outcome_differences,
    outcomes,
    record_facts,
    render_table,
)

TRACKED = load_record()


# Three hosts of the same kind, each by its files. The first is the reference machine
# the record was made on; the two others differ in every fact the catalog knows.
VIRTIO = "sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio3"
HOSTS: dict[str, dict[str, str | None]] = {
    "reference": {
        "dev/vsock": "",
        VIRTIO: None,
        "proc/sys/kernel/io_uring_disabled": "0\n",
        "proc/sys/user/max_user_namespaces": "63000\n",
    },
    "no-vsock-io_uring-off-cgroup2": {
        "proc/sys/kernel/io_uring_disabled": "2\n",
        "proc/sys/user/max_user_namespaces": "63000\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory pids\n",
    },
    "vmci-vsock-io_uring-group-kcore-no-userns": {
        "dev/vsock": "",
        "sys/bus/virtio/drivers": None,
        "proc/kcore": "",
        "proc/sys/kernel/io_uring_disabled": "1\n",
        "proc/sys/user/max_user_namespaces": "0\n",
    },
}
AF_ALG = {"reference": False, "no-vsock-io_uring-off-cgroup2": False}
# The runs each host leaves unjudged: their expectation was never observed there.
UNJUDGED = {
    "reference": set(),
    "no-vsock-io_uring-off-cgroup2": {
        "kernel/vsock_to_host[ablation]",
        "kernel/mounts_and_writable_paths[guards_off]",
        "kernel/mounts_and_writable_paths[ablation]",
        "kernel/sys_writes_and_release_agent[guards_off]",
        "kernel/sys_writes_and_release_agent[ablation]",
    },
    "vmci-vsock-io_uring-group-kcore-no-userns": {"kernel/vsock_to_host[ablation]"},
}
OTHER_KERNEL = "6.1.0-99-amd64"
OTHER_DOCKER = "27.5.1"


@pytest.fixture(params=sorted(HOSTS))
def host(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    name: str = request.param
    root = write_tree(tmp_path, HOSTS[name])  # a host as detect_host_facts reads it
    return name, detect_host_facts(root, af_alg=AF_ALG.get(name, True))


def as_observed(expect: Expect) -> dict[str, Any]:
    """What a host observes when the expectation in force there holds."""
    if expect.outcome == "success":
        return {"outcome": "success", "stage": None, "message": None, "result": expect.result}
    return {
        "outcome": expect.outcome,
        "stage": expect.stage,
        "message": expect.fragment,
        "description": "",
        "result": None,
    }


def simulated_run(facts: dict[str, str], probes: list[Probe]) -> dict[str, Any]:
    """The record a run on a host with ``facts`` would make, if every probe behaves there
    as on the reference host except where the catalog says the facts change it: there,
    it observes what the line for its facts predicts, and an unjudged run observes
    something no expectation mentions."""
    record = copy.deepcopy(TRACKED)
    record.update(
        kernel=OTHER_KERNEL,
        docker=OTHER_DOCKER,
        hostFacts={key: value for key, value in facts.items() if key != "machine"},
    )
    for probe in probes:
        for mode in probe.modes:
            seen = record["probes"][probe.id]["modes"][mode]
            expect = probe.expects.get(mode)
            if expect is None:
                seen.update(
                    expected=None,
                    unjudged=probe.unjudged[mode],
                    holds=None,
                    observed={**seen["observed"], "result": {"never": "established"}},
                )
            elif expect.describe() != seen["expected"]:
                observed = {**seen["observed"], **as_observed(expect)}
                seen.update(
                    expected=expect.describe(),
                    observed=observed,
                    holds=not expect.mismatches(observed),
                )
    return record


def test_the_fake_hosts_have_the_facts_they_are_named_for(
    host: tuple[str, dict[str, str]],
) -> None:
    name, facts = host
    expected = {
        "reference": {
            "vsock": "virtio",
            "io_uring_disabled": "0",
            "af_alg": "no",
            "kcore": "no",
            "userns": "yes",
            "cgroup": "v1",
        },
        "no-vsock-io_uring-off-cgroup2": {
            "vsock": "no",
            "io_uring_disabled": "2",
            "af_alg": "no",
            "kcore": "no",
            "userns": "yes",
            "cgroup": "v2",
        },
        "vmci-vsock-io_uring-group-kcore-no-userns": {
            "vsock": "other",
            "io_uring_disabled": "1",
            "af_alg": "yes",
            "kcore": "yes",
            "userns": "no",
            "cgroup": "v1",
        },
    }[name]
    assert {key: facts[key] for key in expected} == expected
    if name == "reference":
        assert facts == record_facts(TRACKED)


def test_the_catalog_loads_and_says_what_it_cannot_judge(
    host: tuple[str, dict[str, str]],
) -> None:
    name, facts = host
    probes = load_catalog(facts)
    unjudged = unjudged_runs(probes)
    assert {f"{probe_id}[{mode}]" for probe_id, mode, _ in unjudged} == UNJUDGED[name]
    for probe_id, mode, why in unjudged:
        fact = re.search(r"this host has (\w+)=", why)
        assert fact is not None, why
        assert f"{fact.group(1)}={facts[fact.group(1)]}" in why, (probe_id, mode, why)
    # The policy's own layer and the analyzer never depend on the host: every probe's
    # default-policy run is judged everywhere.
    assert all("default" in probe.expects for probe in probes)


def test_a_run_on_another_host_has_the_outcomes_the_docs_show(
    host: tuple[str, dict[str, str]],
) -> None:
    _, facts = host
    probes = load_catalog(facts)
    run = simulated_run(facts, probes)
    tracked = outcomes(TRACKED, load_catalog(record_facts(TRACKED)))
    assert outcome_differences(outcomes(run, probes), tracked) == []
    table = render_table(run, probes)
    assert f"kernel {OTHER_KERNEL}" in table
    assert "outcomes not as expected: **0**" in table
    count = len(UNJUDGED[host[0]])
    assert (f"not judged on this host: {count};" in table) == (count > 0)


def test_the_comparison_fails_on_a_real_difference(host: tuple[str, dict[str, str]]) -> None:
    """Negative controls: the check that passes above can fail."""
    _, facts = host
    probes = load_catalog(facts)
    tracked = outcomes(TRACKED, load_catalog(record_facts(TRACKED)))
    # A host-independent run observing something else (the analyzer let `os` through).
    changed = simulated_run(facts, probes)
    seen = changed["probes"]["python_level/subclasses_walk_to_os"]["modes"]["default"]
    seen["observed"] = {**seen["observed"], "outcome": "success", "result": {"uid": 0}}
    seen["holds"] = False
    problems = outcome_differences(outcomes(changed, probes), tracked)
    assert any("subclasses_walk_to_os[default]" in problem for problem in problems)
    assert any(problem.startswith("outcomes not as expected") for problem in problems)
    # Every run whose expectation is keyed on a fact that differs from the reference
    # host's, not holding there: each is reported.
    keyed = [
        (probe.id, mode)
        for probe in probes
        for mode, expect in probe.expects.items()
        if expect.describe() != TRACKED["probes"][probe.id]["modes"][mode]["expected"]
    ]
    assert bool(keyed) == (facts != record_facts(TRACKED))
    broken = simulated_run(facts, probes)
    for probe_id, mode in keyed:
        seen = broken["probes"][probe_id]["modes"][mode]
        seen["observed"] = {**seen["observed"], "outcome": "crashed"}
        seen["holds"] = False
    problems = outcome_differences(outcomes(broken, probes), tracked)
    for probe_id, mode in keyed:
        assert any(p.startswith(f"{probe_id}[{mode}]: not as expected here") for p in problems)


# -- one fact changed for real ----------------------------------------------------------

IO_URING_SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.fixture
def io_uring_sysctl() -> Iterator[Path]:
    """This host's io_uring sysctl, restored afterwards (it is host-wide; nothing else
    in the suite uses io_uring while one probe runs)."""
    try:
        before = IO_URING_SYSCTL.read_text()
        IO_URING_SYSCTL.write_text(before)
    except OSError as exc:
        pytest.skip(
            f"cannot change kernel.io_uring_disabled here ({exc.strerror}: a kernel before "
            "6.6, or not root): the io_uring expectations for 1 and 2 stay derived"
        )
    try:
        yield IO_URING_SYSCTL
    finally:
        IO_URING_SYSCTL.write_text(before)


@pytest.mark.docker
@pytest.mark.parametrize("value", ["1", "2"])
def test_io_uring_ring_under_a_kernel_that_refuses_io_uring(
    io_uring_sysctl: Path, value: str, base_settings: Settings, task_image: str
) -> None:
    """With Docker's default profile (which allows io_uring) the kernel itself refuses
    the ring when the sysctl says so: the catalog's line for that value is what a host
    with it observes, and its layers line names the kernel."""
    io_uring_sysctl.write_text(value + "\n")
    facts = detect_host_facts()
    assert facts["io_uring_disabled"] == value
    probe = next(p for p in load_catalog(facts) if p.name == "io_uring_ring")
    assert probe.layers == ("kernel",)

    async def run() -> dict[str, Any]:
        factory = pipeline_factory(base_settings, task_image)
        seen: dict[str, Any] = {}
        isolation = docker_default_isolation(base_settings)
        for mode, options in (
            ("guards_off", {}),
            ("ablation", {"isolation": isolation}),
        ):
            async with factory(guards_off=True, **options) as pipeline:
                limits = dataclasses.replace(pipeline.limits, **probe.limits)
                report = await pipeline.run(TaskRequest(code=probe.code, limits=limits))
            seen[mode] = {
                "outcome": report.outcome.value,
                "stage": report.error.stage.value if report.error else None,
                "message": report.error.message if report.error else None,
                "result": report.result,
            }
        return seen

    for mode, observed in asyncio.run(run()).items():
        assert probe.expects[mode].mismatches(observed) == [], (mode, observed)


# -- the kernel string ------------------------------------------------------------------

KERNEL_STRING = re.compile(
    r"platform\.release|platform\.uname|os\.uname|/proc/version|osrelease|KernelVersion"
    r"|\[.kernel.\]"
)
# Where reading it is allowed: the harness records it, the report prints it, and the
# OCI drift test renders a config with it as Docker's daemon does (a seccomp rule may
# name a minimum kernel), then compares the two renderings, never the string.
MAY_READ_KERNEL_STRING = {
    "tests/redteam/harness.py",
    "tests/redteam/report.py",
    "tests/integration/test_oci_backend.py",
}


def test_no_test_reads_the_kernel_string_but_the_record() -> None:
    found = {
        str(path.relative_to(PROJECT_ROOT))
        for path in (PROJECT_ROOT / "tests").rglob("*.py")
        if path.name != Path(__file__).name
        and "probes" not in path.parts
        and KERNEL_STRING.search(path.read_text(encoding="utf-8"))
    }
    assert found == MAY_READ_KERNEL_STRING
