"""Way (b): a bare docker SDK container per task, as a plain SDK user would write it.

``containers.run``-style: create, start, wait, logs, remove, one blocking call
after the other, with the same image, limits and security options as our task
containers (network none, read-only root, tmpfs /tmp, all capabilities dropped,
no-new-privileges, our seccomp profile, memory = memory + swap, CPU quota, pids,
ulimits, ipc none, private cgroup namespace, non-root user, tini as PID 1). The
one difference is the log driver: the SDK reads the output back with ``logs``, so
the container keeps Docker's default (json-file); ours reads the attach stream and
runs without one.

No analyzer, no agent, no envelope: the task is a ``python3 -c`` one-liner that
takes its JSON input as an argument and prints its JSON result. That is the least
work a container per task can do; everything we add must pay for itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import docker
from docker.types import Ulimit

from runner.sandbox.base import Limits
from runner.sandbox.isolation import SANDBOX_USER, IsolationConfig
from runner.sandbox.labels import LABEL_DEADLINE, LABEL_MANAGED, LABEL_OWNER

BENCH_OWNER = "sandbox-runner-bench"
SUM_SCRIPT = (
    "import json, sys; d = json.loads(sys.argv[1]); print(json.dumps({'sum': sum(d['values'])}))"
)


class BareDocker:
    """One container per task through the docker SDK's high-level API."""

    def __init__(
        self, client: docker.DockerClient, image: str, isolation: IsolationConfig, limits: Limits
    ) -> None:
        self._client = client
        self._image = image
        self._isolation = isolation
        self._limits = limits
        self.last_phases_ms: dict[str, float] = {}

    def run(self, values: list[int]) -> dict[str, Any]:
        """Blocking: run the sum in a fresh container and return its JSON result."""
        limits = self._limits
        t0 = time.perf_counter()
        container = self._client.containers.create(
            self._image,
            entrypoint=["tini", "--", "python3", "-I", "-B", "-c", SUM_SCRIPT],
            command=[json.dumps({"values": values}, separators=(",", ":"))],
            user=SANDBOX_USER,
            hostname="sandbox",
            # Labelled like ours, so a crashed benchmark leaves nothing the sweep misses.
            labels={
                LABEL_MANAGED: "true",
                LABEL_OWNER: BENCH_OWNER,
                LABEL_DEADLINE: f"{time.time() + limits.timeout_s + 5:.0f}",
            },
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,size={limits.tmpfs_bytes},mode=1777"},  # noqa: S108
            cap_drop=["ALL"],
            security_opt=self._isolation.security_opt(),
            mem_limit=limits.memory_bytes,
            memswap_limit=limits.memory_bytes,
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            ulimits=[
                Ulimit(name="nofile", soft=limits.nofile, hard=limits.nofile),
                Ulimit(name="fsize", soft=limits.fsize_bytes, hard=limits.fsize_bytes),
                Ulimit(name="nproc", soft=limits.nproc, hard=limits.nproc),
                Ulimit(name="core", soft=0, hard=0),
            ],
            ipc_mode="none",
            cgroupns="private",
        )
        marks = [time.perf_counter()]
        try:
            container.start()
            marks.append(time.perf_counter())
            status = container.wait(timeout=limits.timeout_s + 5)
            marks.append(time.perf_counter())
            output = container.logs(stdout=True, stderr=False)
            marks.append(time.perf_counter())
        finally:
            container.remove(force=True)
            marks.append(time.perf_counter())
        if len(marks) == 5:
            names = ("create", "start", "wait", "logs", "remove")
            edges = [t0, *marks]
            self.last_phases_ms = {
                name: (edges[i + 1] - edges[i]) * 1000 for i, name in enumerate(names)
            }
        if status.get("StatusCode") != 0:
            raise RuntimeError(f"bare container failed: {status}")
        result: dict[str, Any] = json.loads(output)
        return result
