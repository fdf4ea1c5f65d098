"""A :class:`~runner.sandbox.spec.ContainerSpec` rendered as an OCI runtime's ``config.json``.

Owns the OCI rendering of a task container, written to be what Docker 20.10's daemon
generates for the same create request (``daemon/oci_linux.go``, ``oci/defaults.go``,
``profiles/seccomp``) minus what belongs to dockerd itself: its libnetwork prestart
hook (whose one effect on a container with network "none", IPv6 off, is done here by
sysctls), the bind mount of ``/etc/resolv.conf`` (with no network it could only tell a
task the host's resolver), and its own cgroup path. ``/etc/hosts`` (``localhost``) and
``/etc/hostname`` are bound read-only as dockerd binds them, from files the caller
writes (:func:`etc_files`, :func:`etc_binds`). So every default Docker gave us
for free is here, explicitly: the masked and read-only ``/proc`` and ``/sys`` paths,
the device cgroup's allow-list, the ``/dev`` tmpfs, the read-only ``/sys`` and cgroup
mounts, a new network namespace with only ``lo`` (runc brings it up), the private IPC,
PID, UTS, mount and cgroup namespaces, the sysctls, and the seccomp profile converted
from Docker's format exactly as the daemon converts it (filtered by architecture,
capabilities and kernel version). ``tests/integration/test_oci_config.py`` compares
this rendering with the ``config.json`` Docker writes for the same policy.

For gVisor (``runsc``) one thing is said differently, so that it means the same: a
rule that answers ENOSYS (``clone3``) is rendered as ``SCMP_ACT_TRACE`` (see
:func:`oci_seccomp`).

No I/O: the caller passes the machine and kernel release it runs on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from runner.sandbox.spec import ContainerSpec, ImageConfig

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's defaults (moby oci/defaults.go), unchanged by anything we ask for.
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# The device cgroup: deny everything, then the standard character devices (null,
# zero, full, random, urandom, tty, ptmx) and never /dev/net/tun (10:229).
DEVICES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
    {"allow": False, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
)
NAMESPACES = ("mount", "network", "uts", "pid", "ipc", "cgroup")
# Per network namespace in the kernels we run on: what Docker sets in every container.
SYSCTL = {"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647"}
# What dockerd's network hook does for a container with network "none", which is not in
# its config.json: IPv6 off on every interface, lo included (a task sees EADDRNOTAVAIL
# for IPv6 under both engines, not an IPv6 loopback that Docker's containers lack).
NETWORK_NONE_SYSCTL = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv6.conf.lo.disable_ipv6": "1",
}
# What dockerd binds over the image's /etc/hosts for a container with network "none"
# (the image's own is empty: without it, ``localhost`` resolves to nothing), and how.
HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)
ETC_BIND_OPTIONS = ("rbind", "ro", "rprivate")

ENOSYS = 38  # the same number on every architecture we run on (x86_64, aarch64)
# Docker's Go architecture names and libseccomp's (moby profiles/seccomp).
SECCOMP_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "x86", "armv7l": "arm"}
LIBSECCOMP_ARCH = {
    "amd64": "SCMP_ARCH_X86_64",
    "arm64": "SCMP_ARCH_AARCH64",
    "x86": "SCMP_ARCH_X86",
    "arm": "SCMP_ARCH_ARM",
}


def _mounts(spec: ContainerSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["ro", "nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
    ]
    for tmpfs in spec.tmpfs:
        mounts.append(
            {
                "destination": tmpfs.path,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [
                    "rprivate",
                    *tmpfs.options,
                    f"size={tmpfs.size_bytes}",
                    f"mode={tmpfs.mode:o}",
                ],
            }
        )
    return mounts


def _env(image: ImageConfig, hostname: str) -> list[str]:
    """Docker's order: its default PATH and HOSTNAME, then the image's, replacing by key."""
    env = [DEFAULT_PATH, f"HOSTNAME={hostname}"]
    for entry in image.env:
        key = entry.partition("=")[0]
        for index, existing in enumerate(env):
            if existing.partition("=")[0] == key:
                env[index] = entry
                break
        else:
            env.append(entry)
    return env


def _kernel_at_least(release: str, minimum: str) -> bool:
    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

    return numbers(release) >= numbers(minimum)


def oci_seccomp(
    profile_json: str, *, machine: str, kernel_release: str, gvisor: bool = False
) -> dict[str, Any]:
    """A Docker-format seccomp profile as the OCI ``linux.seccomp`` Docker generates.

    Rules are kept or dropped by their ``includes``/``excludes`` on architecture,
    capabilities (a task has none, so a rule that needs one never applies) and
    minimum kernel; the architectures are the native one and its sub-architectures.
    ``defaultErrnoRet`` is kept (Docker 20.10 drops it; runc's default errno for
    ``SCMP_ACT_ERRNO`` is EPERM, so a profile that says 1 means the same either way).

    ``gvisor``: runsc (20221219, Debian 12's) applies the profile inside its kernel but
    ignores a rule's ``errnoRet``: every ``SCMP_ACT_ERRNO`` answers EPERM there. For
    ``clone3`` (ENOSYS, so that glibc falls back to the filtered ``clone``) that EPERM
    made every ``pthread_create`` fail: no task could start a thread. A rule that
    answers ENOSYS becomes ``SCMP_ACT_TRACE`` instead, which gVisor's kernel (as
    Linux) answers with ENOSYS, without running the call, when no tracer is attached;
    none can be, as the profile refuses ``ptrace`` to every process of the container.
    The self-check's canary proves the answer (``clone3`` ENOSYS) on every engine.
    """
    profile = json.loads(profile_json)
    arch = SECCOMP_ARCH.get(machine, machine)
    native = LIBSECCOMP_ARCH.get(arch)
    seccomp: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    architectures = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if entry["architecture"] == native:
            architectures += [entry["architecture"], *(entry.get("subArchitectures") or [])]
            break
    if architectures:
        seccomp["architectures"] = architectures
    rules = []
    for rule in profile.get("syscalls") or []:
        if not _applies(rule, arch=arch, kernel_release=kernel_release):
            continue
        names = [rule["name"]] if rule.get("name") else list(rule["names"])
        converted: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("args"):
            converted["args"] = [_arg(arg) for arg in rule["args"]]
        if "errnoRet" in rule:
            converted["errnoRet"] = rule["errnoRet"]
        if gvisor and rule["action"] == "SCMP_ACT_ERRNO" and rule.get("errnoRet") == ENOSYS:
            converted["action"] = "SCMP_ACT_TRACE"
            del converted["errnoRet"]
        rules.append(converted)
    seccomp["syscalls"] = rules
    return seccomp


def _applies(rule: Mapping[str, Any], *, arch: str, kernel_release: str) -> bool:
    excludes, includes = rule.get("excludes") or {}, rule.get("includes") or {}
    if arch in (excludes.get("arches") or []):
        return False
    # excludes.caps: a task holds no capability, so nothing is excluded by one.
    if excludes.get("minKernel") and _kernel_at_least(kernel_release, excludes["minKernel"]):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if includes.get("caps"):
        return False  # granted only with a capability: never to a task
    return not (
        includes.get("minKernel") and not _kernel_at_least(kernel_release, includes["minKernel"])
    )


def _arg(arg: Mapping[str, Any]) -> dict[str, Any]:
    converted = {"index": arg["index"], "value": arg["value"], "op": arg["op"]}
    if arg.get("valueTwo"):
        converted["valueTwo"] = arg["valueTwo"]
    return converted


RLIMIT_NAMES = {"nofile": "RLIMIT_NOFILE", "fsize": "RLIMIT_FSIZE", "nproc": "RLIMIT_NPROC"}


def etc_files(hostname: str) -> dict[str, str]:
    """The files bound over the image's ``/etc`` ones (name: content), as dockerd's."""
    return {"hostname": f"{hostname}\n", "hosts": HOSTS}


def etc_binds(directory: str) -> list[dict[str, Any]]:
    """Read-only binds of :func:`etc_files` written in ``directory``, in Docker's order
    (``render``'s ``extra_mounts``)."""
    return [
        {
            "destination": f"/etc/{name}",
            "type": "bind",
            "source": f"{directory}/{name}",
            "options": list(ETC_BIND_OPTIONS),
        }
        for name in ("hostname", "hosts")
    ]


def render(
    spec: ContainerSpec,
    image: ImageConfig,
    *,
    rootfs: str,
    cgroups_path: str,
    machine: str,
    kernel_release: str,
    extra_mounts: Sequence[dict[str, Any]] = (),
    gvisor: bool = False,
) -> dict[str, Any]:
    """The ``config.json`` of one task container (root filesystem at ``rootfs``);
    ``gvisor``: for runsc (:func:`oci_seccomp` says what differs)."""
    process: dict[str, Any] = {
        "user": {"uid": spec.uid, "gid": spec.gid, "additionalGids": [spec.gid]},
        "args": list(image.args),
        "env": _env(image, spec.hostname),
        "cwd": image.cwd,
        "capabilities": {},
        "rlimits": [
            {
                "type": RLIMIT_NAMES.get(r.name, f"RLIMIT_{r.name.upper()}"),
                "hard": r.hard,
                "soft": r.soft,
            }
            for r in spec.rlimits
        ],
        "noNewPrivileges": spec.no_new_privileges,
        "oomScoreAdj": 0,
    }
    if spec.apparmor_profile:
        process["apparmorProfile"] = spec.apparmor_profile
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": spec.read_only_root},
        "hostname": spec.hostname,
        "mounts": [*_mounts(spec), *extra_mounts],
        "linux": {
            "sysctl": {**SYSCTL, **NETWORK_NONE_SYSCTL},
            "resources": {
                "devices": [dict(device) for device in DEVICES],
                "memory": {
                    "limit": spec.memory_bytes,
                    "swap": spec.swap_bytes,
                    "disableOOMKiller": False,
                },
                "cpu": {"shares": 0, "quota": spec.cpu_quota_us, "period": spec.cpu_period_us},
                "pids": {"limit": spec.pids},
                "blockIO": {"weight": 0},
            },
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": kind} for kind in NAMESPACES],
            "seccomp": oci_seccomp(
                spec.seccomp_json, machine=machine, kernel_release=kernel_release, gvisor=gvisor
            ),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
