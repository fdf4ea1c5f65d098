"""What a task container is, once, whatever engine makes it.

Owns :class:`ContainerSpec`: everything a task container is made of (the task user,
no capabilities, no-new-privileges, the seccomp and AppArmor profiles, the rlimits,
the cgroup limits, the private namespaces with no network but ``lo``, the read-only
root with a size-capped ``noexec`` tmpfs on ``/tmp``, the hostname, the image's own
command and environment and nothing else), derived by :func:`container_spec` from the
sandbox's :class:`~runner.sandbox.isolation.IsolationConfig` and one task's
:class:`~runner.sandbox.base.Limits`. Each backend renders it: Docker's create request
(:mod:`runner.sandbox.docker`), an OCI runtime's ``config.json``
(:mod:`runner.sandbox.oci.config`). Deriving it once is what keeps the two backends
from drifting; a test compares the OCI config we write with the one Docker generates.

No I/O, no docker, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.sandbox.base import Limits
from runner.sandbox.isolation import IsolationConfig

HOSTNAME = "sandbox"
TMP = "/tmp"  # noqa: S108 - the container's own private tmpfs


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What the task image says about how to run it (Docker applies it itself; an OCI
    runtime is told explicitly)."""

    args: tuple[str, ...]  # entrypoint + command
    env: tuple[str, ...]
    cwd: str = "/"


@dataclass(frozen=True, slots=True)
class Rlimit:
    name: str  # "nofile", "fsize", "nproc", "core"
    soft: int
    hard: int


@dataclass(frozen=True, slots=True)
class Tmpfs:
    path: str
    size_bytes: int
    mode: int = 0o1777
    options: tuple[str, ...] = ("rw", "noexec", "nosuid", "nodev")


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """One task container, engine-neutral. Hashable: the warm pool keys on it."""

    uid: int
    gid: int
    seccomp_json: str
    apparmor_profile: str | None
    no_new_privileges: bool
    memory_bytes: int
    nano_cpus: int
    pids: int
    rlimits: tuple[Rlimit, ...]
    tmpfs: tuple[Tmpfs, ...]
    hostname: str = HOSTNAME
    read_only_root: bool = True
    # Every capability dropped, network none (own namespace, only lo), private IPC,
    # PID, UTS, mount and cgroup namespaces: not options, the product's promise.

    @property
    def swap_bytes(self) -> int:
        """Memory plus swap: equal to memory, so there is no swap at all."""
        return self.memory_bytes

    @property
    def cpu_period_us(self) -> int:
        return 100_000

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per period for ``nano_cpus`` (Docker's own conversion: never 0)."""
        return max(1000, self.nano_cpus * self.cpu_period_us // 1_000_000_000)


def container_spec(isolation: IsolationConfig, limits: Limits) -> ContainerSpec:
    """The task container for ``limits`` under ``isolation``."""
    uid, gid = isolation.uid_gid
    return ContainerSpec(
        uid=uid,
        gid=gid,
        seccomp_json=isolation.seccomp_json,
        apparmor_profile=isolation.apparmor_profile,
        no_new_privileges=isolation.no_new_privileges,
        memory_bytes=limits.memory_bytes,
        nano_cpus=limits.nano_cpus,
        pids=limits.pids,
        rlimits=(
            Rlimit("nofile", limits.nofile, limits.nofile),
            Rlimit("fsize", limits.fsize_bytes, limits.fsize_bytes),
            Rlimit("nproc", limits.nproc, limits.nproc),
            Rlimit("core", 0, 0),  # no core dumps: they would hold the task's memory
        ),
        tmpfs=(Tmpfs(TMP, limits.tmpfs_bytes),),
    )
