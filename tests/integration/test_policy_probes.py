"""Every refusal of the seccomp profile, seen from inside a real task container, and
proof that it is *our* profile that refuses it.

The kernel-policy probe (``probes/syscall_probe.py``) runs as a task (guards off)
twice: under our profile, and with Docker's default profile swapped in
(``policies/reference/docker-default-seccomp.json``, Docker 20.10's own). Both runs
are checked, probe by probe, against the table of ``policies/README.md`` section 1.9:
the table is the specification, this test keeps it true. Rows marked ◀ are refusals
only our profile makes: under Docker's default those calls succeed or fail with the
kernel's own errno, never EPERM, so our profile is what blocks them.

Then ordinary task code (with the default allowlist and guards on) must still work
under the profile.

All of it on both engines (Docker, and an OCI runtime driven directly, which renders
the same profile into its own config): the table holds for each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import re
import statistics
from typing import Any

import docker
import pytest
from redteam.catalog import detect_host_facts

from runner.cli.wiring import load_isolation, make_pipeline
from runner.pipeline import TaskReport
from runner.policy import DOCKER_DEFAULT_PROFILE, load_bundle
from runner.sandbox.base import Outcome
from runner.settings import PROJECT_ROOT, Settings

from .conftest import BACKENDS, GUARDS_OFF, PipelineFactory, make_sandbox, request

README = PROJECT_ROOT / "policies" / "README.md"
PROBE_FILE = PROJECT_ROOT / "tests" / "integration" / "probes" / "syscall_probe.py"
ONLY_OURS = "◀"
# Footnote ³ of the table: a cell that depends on the host. Where the kernel refuses
# io_uring itself (sysctl kernel.io_uring_disabled 1 or 2), io_uring_setup answers
# EPERM under any profile: ours is not the only layer there.
HOST_KEYED = "³"
KERNEL_REFUSES_IO_URING = detect_host_facts()["io_uring_disabled"] in ("1", "2")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the probe table: what each profile answers."""

    probe: str  # a probe name, or a prefix ending in "*"
    ours: str
    docker: str

    @property
    def only_ours(self) -> bool:
        return ONLY_OURS in self.docker


def table_rows() -> list[Row]:
    text = README.read_text(encoding="utf-8")
    start = text.index("| probe | expected | ours | Docker default | no seccomp |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.match(r"`([^`]+)`", cells[0])
        assert name is not None, line
        rows.append(Row(name.group(1), cells[2], cells[3]))
    return rows


ROWS = table_rows()


def expand(row: Row, names: list[str]) -> list[str]:
    if row.probe.endswith("*"):
        return [name for name in names if name.startswith(row.probe[:-1])]
    return [row.probe]


def matches(cell: str, probe: str, result: dict[str, Any]) -> bool:
    """Does a probe result say what the table cell says (on this host)?"""
    if HOST_KEYED in cell and KERNEL_REFUSES_IO_URING:
        return bool(result["errno"] == errno.EPERM)
    value = re.sub(r"[◀¹²³*]", "", cell).strip()
    if value in ("all work", "works"):
        return bool(result["ok"])
    if value == "killed (SIGSYS)":
        return result["errno"] is None and result["ok"] is True
    if value == "succeeded":
        return result["errno"] is None and (not probe.startswith("abi.") or not result["ok"])
    return bool(result["errno"] == getattr(errno, value))


def run_probe(backend: str, settings: Settings, image: str, swap: bool) -> Any:
    """The probe as one task on ``backend``, under our profile or with Docker's default
    swapped in."""
    isolation = load_isolation(settings)
    if swap:
        raw = DOCKER_DEFAULT_PROFILE.read_bytes()
        isolation = dataclasses.replace(
            isolation,
            seccomp_profile=DOCKER_DEFAULT_PROFILE,
            seccomp_json=json.dumps(json.loads(raw), separators=(",", ":")),
            seccomp_sha256=hashlib.sha256(raw).hexdigest(),
            policy_sha256=None,
        )
    source = PROBE_FILE.read_text().replace("from __future__ import annotations", "")

    async def go() -> TaskReport:
        client = docker.from_env(timeout=60)
        sandbox = make_sandbox(
            backend, settings, client, image, isolation=isolation, warm_pool=False
        )
        pipeline = make_pipeline(
            settings, sandbox, image=image, image_id=None, isolation=isolation.report()
        )
        try:
            return await pipeline.run(request(source + "\nreturn run_probes()\n"))
        finally:
            await sandbox.aclose()
            client.close()  # the OCI backend's is not its own to close

    report = asyncio.run(go())
    assert report.outcome is Outcome.SUCCESS, report.document()
    return report.result


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The engine of this module's tests: module-wide, so each runs the probe once."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def probes(base_settings: Settings, task_image: str, backend: str) -> dict[str, dict[str, Any]]:
    settings = Settings(**{**base_settings.model_dump(), **GUARDS_OFF})
    return {
        "ours": run_probe(backend, settings, task_image, swap=False),
        "docker": run_probe(backend, settings, task_image, swap=True),
    }


def test_the_table_and_the_probe_cover_each_other(probes: dict[str, dict[str, Any]]) -> None:
    names = sorted(probes["ours"])
    covered = {name for row in ROWS for name in expand(row, names)}
    assert covered == set(names), "every probe needs a row in policies/README.md 1.9"
    assert sorted(probes["docker"]) == names
    # The list: at least these families are probed.
    for family in (
        "syscall.io_uring_setup",
        "syscall.keyctl",
        "syscall.userfaultfd",
        "syscall.bpf",
        "syscall.perf_event_open",
        "syscall.ptrace",
        "syscall.process_vm_readv",
        "syscall.kcmp",
        "syscall.mount",
        "syscall.fsopen",
        "syscall.move_mount",
        "syscall.open_tree",
        "syscall.mount_setattr",
        "syscall.pivot_root",
        "syscall.chroot",
        "syscall.unshare",
        "syscall.setns",
        "clone.CLONE_NEWUSER",
        "syscall.clone3",
        "syscall.open_by_handle_at",
        "syscall.kexec_load",
        "syscall.init_module",
        "syscall.reboot",
        "syscall.swapon",
        "syscall.acct",
        "syscall.quotactl",
        "syscall.clock_settime",
        "personality.ADDR_NO_RANDOMIZE",
        "socket.AF_PACKET",
        "socket.AF_VSOCK",
        "socket.AF_ALG",
        "socket.AF_NETLINK_AUDIT",
        "socket.AF_INET_SOCK_RAW",
        "abi.i386_int80",
    ):
        assert family in names, family


@pytest.mark.parametrize("row", ROWS, ids=[row.probe for row in ROWS])
def test_our_profile_answers_as_the_table_says(probes: dict[str, dict[str, Any]], row: Row) -> None:
    for name in expand(row, sorted(probes["ours"])):
        result = probes["ours"][name]
        assert result["ok"], f"{name} is not refused as expected under our profile: {result}"
        assert matches(row.ours, name, result), f"{name}: table says {row.ours}, got {result}"


@pytest.mark.parametrize("row", ROWS, ids=[row.probe for row in ROWS])
def test_dockers_default_answers_as_the_table_says(
    probes: dict[str, dict[str, Any]], row: Row
) -> None:
    for name in expand(row, sorted(probes["docker"])):
        result = probes["docker"][name]
        assert matches(row.docker, name, result), f"{name}: table says {row.docker}, got {result}"


ONLY_OURS_ROWS = [row for row in ROWS if row.only_ours]


@pytest.mark.parametrize("row", ONLY_OURS_ROWS, ids=[row.probe for row in ONLY_OURS_ROWS])
def test_our_profile_is_what_blocks_the_marked_probes(
    probes: dict[str, dict[str, Any]], row: Row
) -> None:
    for name in expand(row, sorted(probes["docker"])):
        ours, theirs = probes["ours"][name], probes["docker"][name]
        assert ours["ok"], name
        if HOST_KEYED in row.docker and KERNEL_REFUSES_IO_URING:
            # ³: this host's kernel refuses it under any profile (two layers here).
            assert theirs["errno"] == errno.EPERM, f"{name}: {theirs}"
            continue
        # Under Docker's default the call succeeded or the kernel itself answered.
        assert theirs["errno"] != errno.EPERM, f"{name}: Docker's default refuses it too"
        assert not theirs["ok"], f"{name}: Docker's default already refuses it: {theirs}"


def test_only_our_profile_makes_fifty_three_refusals(probes: dict[str, dict[str, Any]]) -> None:
    names = sorted(probes["docker"])
    marked = {name for row in ONLY_OURS_ROWS for name in expand(row, names)}
    assert len(marked) == 53  # policies/README.md 1.9, "Summary"


def test_what_python_needs_works_under_both_profiles(probes: dict[str, dict[str, Any]]) -> None:
    for profile, results in probes.items():
        works = {name: result for name, result in results.items() if name.startswith("works.")}
        assert len(works) == 25
        assert [name for name, result in works.items() if not result["ok"]] == [], profile


ORDINARY_TASK = """
import collections, datetime, decimal, json, math, re, statistics, threading

orders = json.loads(json.dumps([i["json"] for i in _items]))
totals = collections.Counter()
for order in orders:
    totals[order["customer"]] += decimal.Decimal(order["amount"])
amounts = [float(order["amount"]) for order in orders]
day = datetime.date.fromisoformat("2024-02-28") + datetime.timedelta(days=1)
words = re.findall(r"[a-z]+", "Alpha beta, gamma!".lower())
results = []
worker = threading.Thread(target=lambda: results.append(math.factorial(10)))
worker.start()
worker.join(10)
return [{"json": {
    "totals": {name: str(value) for name, value in sorted(totals.items())},
    "mean": statistics.mean(amounts),
    "stdev": round(statistics.stdev(amounts), 6),
    "hypot": math.hypot(3, 4),
    "day": day.isoformat(),
    "words": words,
    "fromThread": results,
}}]
"""


async def test_ordinary_task_code_works_under_the_profile(
    make_task_pipeline: PipelineFactory,
) -> None:
    """With the guards on: the policy's default allowlist plus threading."""
    default = load_bundle(PROJECT_ROOT / "policies").config.imports.stdlib_allow
    items = [
        {"json": {"customer": "ada", "amount": "10.10"}},
        {"json": {"customer": "bob", "amount": "2.50"}},
        {"json": {"customer": "ada", "amount": "0.20"}},
    ]
    async with make_task_pipeline(stdlib_allow=",".join([*default, "threading"])) as pipeline:
        report = await pipeline.run(request(ORDINARY_TASK, items))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == [
        {
            "json": {
                "totals": {"ada": "10.30", "bob": "2.50"},
                "mean": pytest.approx(statistics.mean([10.10, 2.50, 0.20])),
                "stdev": round(statistics.stdev([10.10, 2.50, 0.20]), 6),
                "hypot": 5.0,
                "day": "2024-02-29",
                "words": ["alpha", "beta", "gamma"],
                "fromThread": [3628800],
            }
        }
    ]
    assert report.audit["policySha256"] == load_bundle(PROJECT_ROOT / "policies").sha256
