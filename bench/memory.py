"""Host memory of a container and of the processes around it (Linux, read from /proc and
the cgroup filesystem; needs the rights to read them, root on the reference machine).

What "everything counted" means for one container (see bench/README.md):

- the container's memory cgroup: ``memory.usage_in_bytes`` (v1) / ``memory.current``
  (v2) -- its processes' anonymous memory, the page cache and the kernel memory
  (slab, page tables, socket buffers) charged to it;
- its ``containerd-shim-runc-v2`` process, one per container, outside the cgroup:
  counted by PSS (its private pages plus its share of the pages all shims share,
  such as the Go binary's text), and by RSS as an upper bound;
- the daemons' (dockerd, containerd) growth per container, and the runner's own
  per-slot cost, measured as differences over several slots.
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


def container_cgroup(container_id: str) -> dict[str, Any] | None:
    """The container's memory cgroup, in KiB: usage, peak, anon, page cache, kernel."""
    v1 = CGROUP_ROOT / "memory" / "docker" / container_id
    if v1.is_dir():
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
    for v2 in (
        CGROUP_ROOT / "system.slice" / f"docker-{container_id}.scope",
        CGROUP_ROOT / "docker" / container_id,
    ):
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


def shim_memory(container_id: str) -> dict[str, int] | None:
    """The containerd shim serving this container (one shim per container on Docker)."""
    for pid, cmdline in _pids_by_cmdline("containerd-shim"):
        if container_id in cmdline:
            return process_memory(pid)
    return None


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
