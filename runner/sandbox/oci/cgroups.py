"""The cgroups of our task containers, as the host sees them (v1, v2 and hybrid).

Owns: which cgroup layout this host has (:func:`layout`), whether we may create
cgroups here (:func:`writable`), the cgroup path of a container
(``/sandbox-runner/<runner id>/<container id>``: the runtime creates it in every
hierarchy and deletes it with the container), and the counters the host reads
there before the container is deleted: OOM kills and hits of the pids limit; and the
limits applied to a running container (memory, pids, CPU quota and period). These
are the kernel's own counts and settings, read from the host: never what the
container reports.
Also the sweep's backstop: removing the cgroup directories of containers whose
runtime state is gone.

Reads and writes ``/sys/fs/cgroup`` only. The root is a parameter so that tests can
give a fake tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from runner.sandbox.base import AppliedLimits

ROOT = Path("/sys/fs/cgroup")
PARENT = "sandbox-runner"
# The v1 hierarchies our containers get a cgroup in, and whose counters we read.
V1_COUNTERS = {"memory": ("memory.oom_control", "oom_kill"), "pids": ("pids.events", "max")}


def layout(root: Path = ROOT) -> str:
    """``v2`` (unified), ``hybrid`` (v1 controllers and a v2 tree beside them), ``v1``,
    or ``none``."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "memory").is_dir() or (root / "pids").is_dir():
        return "hybrid" if (root / "unified" / "cgroup.controllers").exists() else "v1"
    return "none"


def writable(root: Path = ROOT) -> bool:
    """May this process create cgroups (is the hierarchy mounted read-write for us)?"""
    base = root if layout(root) == "v2" else root / "memory"
    return os.access(base, os.W_OK)


def path_of(runner_id: str, container_id: str) -> str:
    """The container's ``cgroupsPath`` (absolute: under the root of each hierarchy)."""
    return f"/{PARENT}/{_safe(runner_id)}/{container_id}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _counter(file: Path, key: str) -> int | None:
    try:
        text = file.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def oom_kills(cgroups_path: str, root: Path = ROOT) -> int | None:
    """OOM kills in the container's memory cgroup (None: not readable)."""
    if layout(root) == "v2":
        return _counter(root / cgroups_path.lstrip("/") / "memory.events", "oom_kill")
    file, key = V1_COUNTERS["memory"]
    return _counter(root / "memory" / cgroups_path.lstrip("/") / file, key)


def pids_max_hits(cgroups_path: str, root: Path = ROOT) -> int | None:
    """Times a fork or clone was refused by the container's pids limit."""
    if layout(root) == "v2":
        return _counter(root / cgroups_path.lstrip("/") / "pids.events", "max")
    file, key = V1_COUNTERS["pids"]
    return _counter(root / "pids" / cgroups_path.lstrip("/") / file, key)


def _read(file: Path) -> str | None:
    try:
        return file.read_text(encoding="ascii").strip()
    except OSError:
        return None


def applied_limits(cgroups_path: str, root: Path = ROOT, *, pids_room: int = 0) -> AppliedLimits:
    """The memory, pids and CPU limits of the container's cgroups, as the host has them
    (``pids_room``: what the engine added to the pids cgroup beside the task's limit)."""
    kind = layout(root)
    relative = cgroups_path.lstrip("/")
    if kind == "v2":
        directory = root / relative
        quota, _, period = (_read(directory / "cpu.max") or "").partition(" ")
        return AppliedLimits(
            cgroup=kind,
            memory_limit=_read(directory / "memory.max"),
            pids_max=_read(directory / "pids.max"),
            cpu_quota=quota or None,
            cpu_period=period or None,
            pids_room=pids_room,
        )
    cpu = next(
        (
            root / name / relative
            for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu")
            if (root / name).is_dir()
        ),
        root / "cpu" / relative,
    )
    return AppliedLimits(
        cgroup=kind,
        memory_limit=_read(root / "memory" / relative / "memory.limit_in_bytes"),
        pids_max=_read(root / "pids" / relative / "pids.max"),
        cpu_quota=_read(cpu / "cpu.cfs_quota_us"),
        cpu_period=_read(cpu / "cpu.cfs_period_us"),
        pids_room=pids_room,
    )


def leftover_containers(runner_id: str, root: Path = ROOT) -> list[str]:
    """Container ids with a cgroup under this runner's parent, in any hierarchy."""
    found: set[str] = set()
    relative = Path(PARENT) / _safe(runner_id)
    if layout(root) == "v2":
        parents = [root / relative]
    else:
        parents = [hierarchy / relative for hierarchy in _hierarchies(root)]
    for parent in parents:
        with contextlib.suppress(OSError):
            found.update(entry.name for entry in parent.iterdir() if entry.is_dir())
    return sorted(found)


def every_container(root: Path = ROOT) -> dict[str, tuple[str, float]]:
    """Every container with a cgroup under our parent, of any runner: its runner (the
    directory name, as :func:`path_of` made it) and the newest change time of its
    directories (a cgroup being made right now is new)."""
    found: dict[str, tuple[str, float]] = {}
    parents = [root / PARENT] if layout(root) == "v2" else [h / PARENT for h in _hierarchies(root)]
    for parent in parents:
        with contextlib.suppress(OSError):
            for runner in parent.iterdir():
                with contextlib.suppress(OSError):
                    for entry in runner.iterdir():
                        if entry.is_dir():
                            changed = entry.stat().st_ctime
                            known = found.get(entry.name, (runner.name, 0.0))[1]
                            found[entry.name] = (runner.name, max(known, changed))
    return found


def remove_empty_parents(root: Path = ROOT) -> None:
    """The per-runner parents with no container cgroup left (the kernel removes an
    empty cgroup only: one with a container in it stays; a runtime that needs a parent
    again makes it again)."""
    parents = [root / PARENT] if layout(root) == "v2" else [h / PARENT for h in _hierarchies(root)]
    for parent in parents:
        with contextlib.suppress(OSError):
            for runner in parent.iterdir():
                with contextlib.suppress(OSError):
                    runner.rmdir()


def remove(runner_id: str, container_id: str, root: Path = ROOT, *, kill: bool = True) -> None:
    """Remove a container's cgroups whose runtime state is gone: what still runs in
    them is killed first (an empty cgroup is the only one that can be removed);
    ``kill=False``: only if nothing runs in them (another runner's, which may be alive)."""
    relative = path_of(runner_id, container_id).lstrip("/")
    directories = (
        [root / relative] if layout(root) == "v2" else [h / relative for h in _hierarchies(root)]
    )
    for directory in directories:
        if not directory.is_dir():
            continue
        if kill:
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError):
            directory.rmdir()  # EBUSY while anything runs in it: left for a later sweep


def _hierarchies(root: Path) -> list[Path]:
    """Every hierarchy a container has a cgroup in: each v1 controller's and, on a
    hybrid host, the v2 tree beside them (``unified``), where runc makes one too. Only
    our removal removes it once runc's ``delete`` is not run (a reaped container's
    state is removed without the runtime), so it must be swept like the others."""
    if not root.is_dir():
        return []
    return [entry for entry in root.iterdir() if entry.is_dir()]
