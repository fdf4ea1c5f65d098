"""Host memory of a container and of the processes around it (Linux, read from /proc and
the cgroup filesystem; needs the rights to read them, root on the reference machine).

What "everything counted" means for one container (see bench/README.md):

- the container's memory cgroup: ``memory.usage_in_bytes`` (v1) / ``memory.current``
  (v2) -- its processes' anonymous memory, the page cache and the kernel memory
  (slab, page tables, socket buffers) charged to it;
- the processes serving it from outside the cgroup: on Docker its
  ``containerd-shim-runc-v2`` process, one per container; on the OCI backend with
  runc none (runc exits once the container runs): counted by PSS (private pages plus
  a share of the pages shared, such as a Go binary's text), and by RSS as an upper
  bound;
- on Docker, the daemons' (dockerd, containerd) growth per container; and the
  runner's own per-slot cost, measured as differences over several slots.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
KIB = 1024


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _cgroup_dirs(container_id: str, hierarchy: Path) -> list[Path]:
    """Where a container's cgroup may be under ``hierarchy``: Docker's (cgroupfs or
    systemd driver) or the OCI backend's (``sandbox-runner/<runner>/<id>``)."""
    return [
        hierarchy / "docker" / container_id,
        hierarchy / "system.slice" / f"docker-{container_id}.scope",
        *sorted(hierarchy.glob(f"sandbox-runner/*/{container_id}")),
    ]


def container_cgroup(container_id: str) -> dict[str, Any] | None:
    """The container's memory cgroup, in KiB: usage, peak, anon, page cache, kernel."""
    for v1 in _cgroup_dirs(container_id, CGROUP_ROOT / "memory"):
        if not (v1 / "memory.usage_in_bytes").exists():
            continue
        stat = _read_stat(v1 / "memory.stat")
        usage = _read_int(v1 / "memory.usage_in_bytes")
        peak = _read_int(v1 / "memory.max_usage_in_bytes")
        kmem = _read_int(v1 / "memory.kmem.usage_in_bytes")
        return {
            "cgroup": "v1",
            "usage_kib": usage // KIB if usage is not None else None,
            "peak_kib": peak // KIB if peak is not None else None,
            "anon_kib": stat.get("total_rss", 0) // KIB,
            "cache_kib": stat.get("total_cache", 0) // KIB,
            "kernel_kib": kmem // KIB if kmem is not None else None,
        }
    for v2 in _cgroup_dirs(container_id, CGROUP_ROOT):
        if (v2 / "memory.current").exists():
            stat = _read_stat(v2 / "memory.stat")
            usage = _read_int(v2 / "memory.current")
            peak = _read_int(v2 / "memory.peak")
            return {
                "cgroup": "v2",
                "usage_kib": usage // KIB if usage is not None else None,
                "peak_kib": peak // KIB if peak is not None else None,
                "anon_kib": stat.get("anon", 0) // KIB,
                "cache_kib": stat.get("file", 0) // KIB,
                "kernel_kib": stat.get("kernel", 0) // KIB,
            }
    return None


def process_memory(pid: int) -> dict[str, int] | None:
    """RSS, PSS and private memory of one process, and its peak RSS, in KiB."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            match = re.match(r"(\w+):\s+(\d+) kB", line)
            if match:
                values[match[1]] = int(match[2])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                values["VmHWM"] = int(line.split()[1])
    except OSError:
        return None
    return {
        "rss_kib": values.get("Rss", 0),
        "pss_kib": values.get("Pss", 0),
        "private_kib": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
        "peak_rss_kib": values.get("VmHWM", 0),
    }


def _pids_by_cmdline(pattern: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in cmdline:
            found.append((int(entry), cmdline))
    return found


def _in_cgroup_of(pid: int, container_id: str) -> bool:
    """Is ``pid`` in the container's own cgroup (memory controller on v1, the unified
    tree on v2)? Such a process is counted by the cgroup already."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if ("memory" in controllers.split(",") or controllers == "") and container_id in path:
            return True
    return False


def outside_memory(container_id: str) -> dict[str, int]:
    """The processes serving this container from outside its cgroup, summed: on Docker
    its containerd shim (one per container); on the OCI backend with runc nothing (runc
    exits once the container runs); under gVisor whatever of the sandbox kernel's
    processes the runtime keeps outside. Found by the container id in their command
    line."""
    total = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
    for pid, _ in _pids_by_cmdline(container_id):
        if pid == os.getpid() or _in_cgroup_of(pid, container_id):
            continue
        memory = process_memory(pid)
        if memory is None:
            continue
        total["rss_kib"] += memory["rss_kib"]
        total["pss_kib"] += memory["pss_kib"]
        total["processes"] += 1
    return total


def daemon_memory() -> dict[str, dict[str, int] | None]:
    out: dict[str, dict[str, int] | None] = {}
    for name in ("dockerd", "containerd"):
        pids = [pid for pid, cmd in _pids_by_cmdline(name) if cmd.split()[0].endswith(name)]
        out[name] = process_memory(pids[0]) if pids else None
    return out


def host_used_kib() -> int:
    """MemTotal - MemAvailable: what the host cannot hand out without reclaiming."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        info[name] = int(rest.split()[0])
    return info["MemTotal"] - info["MemAvailable"]
