"""The OCI backend's pure parts, without a runtime: the cgroup layouts and counters on
fake trees, the seccomp conversion, the rendered config, the runtime's verdict on a
host, and the shared root's fitness check.

What the rendering must equal is Docker's own ``config.json`` for the same policy:
tests/integration/test_oci_config.py compares them on this host's daemon.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import write_tree

from runner.policy import load_policy
from runner.sandbox.base import AppliedLimits, Limits
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.oci import cgroups, runtime
from runner.sandbox.oci.config import MASKED_PATHS, READONLY_PATHS, oci_seccomp, render
from runner.sandbox.oci.rootfs import RootfsStore, tar_filtered
from runner.sandbox.oci.sandbox import GVISOR_PIDS_PER_TASK, GVISOR_SENTRY_PIDS, OciSandbox
from runner.sandbox.spec import ContainerSpec, ImageConfig, container_spec
from runner.settings import Settings

TASK_UID = 10001


# -- cgroups ----------------------------------------------------------------------------

V1_COUNTERS = {
    "memory/sandbox-runner/r1/c1/memory.oom_control": (
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
    ),
    "pids/sandbox-runner/r1/c1/pids.events": "max 7\n",
    "pids/sandbox-runner/r1/c2": None,
}
V2_COUNTERS = {
    "cgroup.controllers": "cpu memory pids\n",
    "sandbox-runner/r1/c1/memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
    "sandbox-runner/r1/c1/pids.events": "max 0\n",
}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory": None, "pids": None}, "v1"),
        ({"memory": None, "unified/cgroup.controllers": ""}, "hybrid"),
        ({"cgroup.controllers": ""}, "v2"),
        ({}, "none"),
    ],
)
def test_the_layout_is_read_from_the_tree(
    tmp_path: Path, files: dict[str, str | None], expected: str
) -> None:
    assert cgroups.layout(write_tree(tmp_path, files)) == expected


def test_counters_are_the_kernels_on_v1(tmp_path: Path) -> None:
    root = write_tree(tmp_path, V1_COUNTERS)
    path = cgroups.path_of("r1", "c1")
    assert path == "/sandbox-runner/r1/c1"
    assert cgroups.oom_kills(path, root) == 2
    assert cgroups.pids_max_hits(path, root) == 7
    assert cgroups.oom_kills(cgroups.path_of("r1", "gone"), root) is None
    assert cgroups.leftover_containers("r1", root) == ["c1", "c2"]


def test_counters_are_the_kernels_on_v2(tmp_path: Path) -> None:
    root = write_tree(tmp_path, V2_COUNTERS)
    path = cgroups.path_of("r1", "c1")
    assert cgroups.oom_kills(path, root) == 1
    assert cgroups.pids_max_hits(path, root) == 0
    assert cgroups.leftover_containers("r1", root) == ["c1"]


@pytest.mark.parametrize(
    ("files", "layout"),
    [
        (
            {
                "memory/sandbox-runner/r1/c1/memory.limit_in_bytes": "67108864\n",
                "pids/sandbox-runner/r1/c1/pids.max": "288\n",
                "cpu/sandbox-runner/r1/c1/cpu.cfs_quota_us": "100000\n",
                "cpu/sandbox-runner/r1/c1/cpu.cfs_period_us": "100000\n",
                "unified/cgroup.controllers": "",
            },
            "hybrid",
        ),
        (
            {
                "cgroup.controllers": "cpu memory pids\n",
                "sandbox-runner/r1/c1/memory.max": "67108864\n",
                "sandbox-runner/r1/c1/pids.max": "288\n",
                "sandbox-runner/r1/c1/cpu.max": "100000 100000\n",
            },
            "v2",
        ),
    ],
)
def test_the_applied_limits_are_read_from_the_hosts_tree(
    tmp_path: Path, files: dict[str, str | None], layout: str
) -> None:
    root = write_tree(tmp_path, files)
    applied = cgroups.applied_limits(cgroups.path_of("r1", "c1"), root, pids_room=256)
    assert applied == AppliedLimits(layout, "67108864", "288", "100000", "100000", pids_room=256)
    gone = cgroups.applied_limits(cgroups.path_of("r1", "gone"), root)
    assert (gone.memory_limit, gone.pids_max, gone.cpu_quota, gone.cpu_period) == (None,) * 4


def test_a_runner_id_cannot_climb_out_of_our_parent() -> None:
    assert cgroups.path_of("../../etc", "c1") == "/sandbox-runner/.._.._etc/c1"
    assert cgroups.path_of("", "c1") == "/sandbox-runner/_/c1"


def test_removal_of_an_empty_leftover_cgroup(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path, {"memory/sandbox-runner/r1/c9": None, "pids/sandbox-runner/r1/c9": None}
    )
    (root / "memory/sandbox-runner/r1/c9/cgroup.procs").write_text("")
    cgroups.remove("r1", "c9", root)
    # A real cgroup directory goes with rmdir; in this fake one the file keeps it, so
    # only the one without files is gone: what matters is that nothing raises.
    assert not (root / "pids/sandbox-runner/r1/c9").exists()


def test_a_hybrid_hosts_v2_tree_is_swept_with_the_v1_controllers(tmp_path: Path) -> None:
    # runc makes a container's cgroup in the v2 tree beside the v1 controllers too;
    # once a reaped container is not deleted through runc, only our removal takes it.
    root = write_tree(
        tmp_path,
        {
            "unified/cgroup.controllers": "",
            "memory/sandbox-runner/r1/c1": None,
            "unified/sandbox-runner/r1/c1": None,
            "unified/sandbox-runner/r1/c2": None,
        },
    )
    assert cgroups.layout(root) == "hybrid"
    assert cgroups.leftover_containers("r1", root) == ["c1", "c2"]
    cgroups.remove("r1", "c2", root)
    assert not (root / "unified/sandbox-runner/r1/c2").exists()
    cgroups.remove("r1", "c1", root)
    assert cgroups.leftover_containers("r1", root) == []


def test_every_runners_containers_are_found_and_empty_parents_removed(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "unified/cgroup.controllers": "",
            "memory/sandbox-runner/r1/c1": None,
            "unified/sandbox-runner/r1/c1": None,
            "unified/sandbox-runner/r2/c2": None,
            "pids/sandbox-runner/r3": None,
        },
    )
    found = cgroups.every_container(root)
    assert {cid: runner for cid, (runner, _) in found.items()} == {"c1": "r1", "c2": "r2"}
    cgroups.remove_empty_parents(root)
    # r3 had no container: gone; r1 and r2 still hold theirs.
    assert not (root / "pids/sandbox-runner/r3").exists()
    assert (root / "unified/sandbox-runner/r2/c2").is_dir()
    cgroups.remove("r2", "c2", root)
    cgroups.remove_empty_parents(root)
    assert not (root / "unified/sandbox-runner/r2").exists()
    assert (root / "unified/sandbox-runner/r1/c1").is_dir()


def hold_lease(root: Path) -> subprocess.Popen[str]:
    """Another runner's process using ``root``: it holds the lease, as ensure() takes it."""
    lease = str(root) + ".lease"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; "
            f"fd = os.open({lease!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_SH); "
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_prune_removes_only_roots_no_container_names_and_no_live_runner_leases(
    tmp_path: Path,
) -> None:
    directory = write_tree(
        tmp_path / "rootfs",
        {
            "v2-aaaa/usr/bin/python3": "",  # leased by a live runner
            "v2-bbbb/usr/bin/python3": "",  # named by a container's bundle
            "v2-cccc/usr/bin/python3": "",  # nobody's
            "v2-dddd.partial-1-x/usr": None,  # being unpacked: its own clean-up
        },
    )
    store = RootfsStore(directory, client=Any, task_uid=10001)  # type: ignore[arg-type]
    runner = hold_lease(directory / "v2-aaaa")
    try:
        removed = store.prune(in_use={directory / "v2-bbbb"})
        assert removed == [directory / "v2-cccc"]
        assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == [
            "v2-aaaa",
            "v2-bbbb",
            "v2-dddd.partial-1-x",
        ]
    finally:
        assert runner.stdin is not None
        assert runner.stdout is not None
        runner.stdin.close()
        runner.wait(10)
        runner.stdout.close()
    # The runner is gone, whatever way it went: the kernel dropped its lease.
    assert store.prune(in_use=set()) == [directory / "v2-aaaa", directory / "v2-bbbb"]
    assert not (directory / "v2-aaaa.lease").exists()


# -- seccomp ------------------------------------------------------------------------------

PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
    ],
    "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW", "comment": "kept"},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["arm_only"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["new_call"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.9"}},
        {"names": ["old_call"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "6.9"}},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ],
}


def test_seccomp_is_converted_as_dockers_daemon_converts_it() -> None:
    converted = oci_seccomp(json.dumps(PROFILE), machine="x86_64", kernel_release="6.1.0-17-amd64")
    assert converted["defaultAction"] == "SCMP_ACT_ERRNO"
    assert converted["defaultErrnoRet"] == 1
    assert converted["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    names = [rule["names"][0] for rule in converted["syscalls"]]
    # arm64-only, capability-granted and too-new rules go; the task holds no capability,
    # so nothing is excluded by one.
    assert names == ["read", "arch_prctl", "ptrace", "old_call", "clone", "clone3"]
    clone = converted["syscalls"][4]
    assert clone["args"] == [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]
    assert converted["syscalls"][5]["errnoRet"] == 38
    assert all("comment" not in rule for rule in converted["syscalls"])
    newer = oci_seccomp(json.dumps(PROFILE), machine="x86_64", kernel_release="6.18.44-fc")
    assert [rule["names"][0] for rule in newer["syscalls"]][3] == "new_call"


def test_for_gvisor_an_enosys_rule_is_a_trace_no_tracer_can_answer() -> None:
    # runsc (20221219) ignores a rule's errnoRet: clone3 would answer EPERM, and glibc
    # then starts no thread at all; a trace with no tracer is ENOSYS in gVisor's kernel.
    runc = oci_seccomp(json.dumps(PROFILE), machine="x86_64", kernel_release="6.1.0")
    runsc = oci_seccomp(json.dumps(PROFILE), machine="x86_64", kernel_release="6.1.0", gvisor=True)
    assert runc["syscalls"][-1] == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    assert runsc["syscalls"][-1] == {"names": ["clone3"], "action": "SCMP_ACT_TRACE"}
    assert runsc["syscalls"][:-1] == runc["syscalls"][:-1]  # nothing else differs
    assert {k: v for k, v in runsc.items() if k != "syscalls"} == {
        k: v for k, v in runc.items() if k != "syscalls"
    }


def test_under_gvisor_the_sandbox_kernel_counts_the_tasks_threads() -> None:
    # runsc's sandbox kernel holds the task's threads to RLIMIT_NPROC (its own count,
    # per container), the pids cgroup its own threads: the limit goes to the first,
    # with room for the second.
    policy = load_policy(Settings())
    isolation = IsolationConfig.from_policy(policy, apparmor_available=False)
    limits = Limits(pids=32, nproc=4096)

    def spec_for(kind: str) -> ContainerSpec:
        # A stand-in for the sandbox: _spec reads these two only (a real OciSandbox
        # would make this process a child subreaper).
        fake = SimpleNamespace(_isolation=isolation, _runtime=SimpleNamespace(kind=kind))
        spec: ContainerSpec = OciSandbox._spec(fake, limits)  # type: ignore[arg-type]
        return spec

    def nproc(spec: ContainerSpec) -> tuple[int, int]:
        (rlimit,) = [r for r in spec.rlimits if r.name == "nproc"]
        return rlimit.soft, rlimit.hard

    runc, runsc = spec_for("runc"), spec_for("runsc")
    assert (runc.pids, nproc(runc)) == (32, (4096, 4096))
    room = GVISOR_SENTRY_PIDS + GVISOR_PIDS_PER_TASK * 32  # its threads, the tasks' stubs
    assert (runsc.pids, nproc(runsc)) == (32 + room, (32, 32))


# -- the rendered config ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    policy = load_policy(Settings())
    isolation = IsolationConfig.from_policy(policy, apparmor_available=False)
    limits = Limits(memory_bytes=64 << 20, cpus=0.01, pids=32, tmpfs_bytes=1 << 20)
    image = ImageConfig(args=("tini", "--", "python3"), env=("PATH=/bin", "LANG=C.UTF-8"))
    return render(
        container_spec(isolation, limits),
        image,
        rootfs="/var/lib/sandbox-runner/rootfs/x",
        cgroups_path="/sandbox-runner/r/c",
        machine="x86_64",
        kernel_release="6.1.0",
    )


def test_the_task_process_gets_nothing_it_need_not_have(rendered: dict[str, Any]) -> None:
    process = rendered["process"]
    assert process["user"] == {"uid": TASK_UID, "gid": TASK_UID, "additionalGids": [TASK_UID]}
    assert process["capabilities"] == {}
    assert process["noNewPrivileges"] is True
    # Docker's order: its PATH replaced by the image's, HOSTNAME, then the image's rest.
    assert process["env"] == ["PATH=/bin", "HOSTNAME=sandbox", "LANG=C.UTF-8"]
    assert {r["type"] for r in process["rlimits"]} == {
        "RLIMIT_NOFILE",
        "RLIMIT_FSIZE",
        "RLIMIT_NPROC",
        "RLIMIT_CORE",
    }
    assert rendered["root"] == {"path": "/var/lib/sandbox-runner/rootfs/x", "readonly": True}


def test_the_container_has_docker_defaults_made_explicit(rendered: dict[str, Any]) -> None:
    linux = rendered["linux"]
    assert [n["type"] for n in linux["namespaces"]] == [
        "mount",
        "network",
        "uts",
        "pid",
        "ipc",
        "cgroup",
    ]
    assert all("path" not in n for n in linux["namespaces"])  # new ones, never a host's
    # THREATS.md's list, at least.
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        assert path in MASKED_PATHS
    assert "/sys/firmware" in linux["maskedPaths"]
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(READONLY_PATHS)
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    mounts = {m["destination"]: m for m in rendered["mounts"]}
    assert "ro" in mounts["/sys"]["options"]
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert {"noexec", "nosuid", "nodev", "size=1048576", "mode=1777"} <= set(
        mounts["/tmp"]["options"]
    )
    assert not [m for m in rendered["mounts"] if m["type"] == "bind"]  # no host path, ever


def test_limits_are_rendered_exactly_and_never_as_unlimited(rendered: dict[str, Any]) -> None:
    resources = rendered["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20, "disableOOMKiller": False}
    assert resources["pids"] == {"limit": 32}
    # 0.01 CPU: 1 ms per 100 ms period (a quota of 0 or -1 would be no limit).
    assert (resources["cpu"]["quota"], resources["cpu"]["period"]) == (1000, 100_000)


# -- the runtime's verdict on this host ----------------------------------------------------


def test_crun_on_a_hybrid_host_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cgroups, "layout", lambda root=cgroups.ROOT: "hybrid")
    monkeypatch.setattr(cgroups, "writable", lambda root=cgroups.ROOT: True)
    reason = runtime.why_not("crun")
    assert reason is not None
    assert "hybrid" in reason
    assert runtime.why_not("runc") is None
    monkeypatch.setattr(cgroups, "layout", lambda root=cgroups.ROOT: "v2")
    assert runtime.why_not("crun") is None


def test_without_root_or_writable_cgroups_the_oci_backend_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (runtime.why_not("runc") or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cgroups, "layout", lambda root=cgroups.ROOT: "v1")
    monkeypatch.setattr(cgroups, "writable", lambda root=cgroups.ROOT: False)
    assert "not writable" in (runtime.why_not("runc") or "")


def test_a_runtime_is_found_by_name_or_path(tmp_path: Path) -> None:
    assert runtime.find_runtime("not-a-runtime") is None
    binary = tmp_path / "runsc-2022"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert runtime.find_runtime(str(binary)) == ("runsc", str(binary))
    assert runtime.find_runtime(str(tmp_path / "missing")) is None


# -- the shared root ------------------------------------------------------------------------


def test_an_unfit_shared_root_is_refused_with_every_reason(tmp_path: Path) -> None:
    store = RootfsStore(tmp_path / "store", client=None, task_uid=TASK_UID)  # type: ignore[arg-type]
    root = write_tree(tmp_path / "root", {"usr/bin/ok": "", "usr/bin/suid": "", "var/open": None})
    (root / "usr/bin/suid").chmod(0o4755)
    (root / "var/open").chmod(0o777)
    (root / "usr/bin/ok").chmod(0o755)
    mine = root / "usr/bin/mine"
    mine.write_text("")
    os.chown(mine, TASK_UID, 0)
    problems = store.check(root)
    assert "/usr/bin/suid is setuid or setgid" in problems
    assert "/var/open is writable by others than its owner" in problems
    assert "/usr/bin/mine belongs to the task user" in problems
    assert not any(p.startswith("/usr/bin/ok") for p in problems)


def _archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for info, content in members:
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content else None)
    data.seek(0)
    return data


def _entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root``: its mode bits and, for a symlink, its target."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        link = os.readlink(path) if path.is_symlink() else ""
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), link)
    return found


FIT_IMAGE = [
    (_entry("usr", tarfile.DIRTYPE, 0o755), b""),
    (_entry("usr/bin", tarfile.DIRTYPE, 0o775), b""),
    (_entry("usr/bin/su", mode=0o4755), b"#!"),
    (_entry("usr/bin/shared", mode=0o666), b"x"),
    (_entry("usr/bin/python", tarfile.SYMTYPE, 0o777, "/usr/bin/python3.11"), b""),
    (_entry("usr/bin/again", tarfile.LNKTYPE, 0o4755, "usr/bin/su"), b""),
    (_entry("/etc", tarfile.DIRTYPE, 0o755), b""),
    (_entry("/etc/hosts"), b"127.0.0.1 localhost\n"),
    (_entry("tmp", tarfile.DIRTYPE, 0o1777), b""),
]


def test_the_image_unpacks_by_the_tar_filters_rules_without_the_standard_librarys(
    tmp_path: Path,
) -> None:
    # The runner image's Python (Debian's 3.11.2) has no extraction filter; its
    # replacement must give the very tree the standard library's "tar" filter gives.
    assert hasattr(tarfile, "tar_filter"), "this test compares with the stdlib filter"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    with tarfile.open(fileobj=_archive(FIT_IMAGE), mode="r|") as archive:
        archive.extractall(ours, members=tar_filtered(archive, ours))
    with tarfile.open(fileobj=_archive(FIT_IMAGE), mode="r|") as archive:
        archive.extractall(theirs, filter="tar")
    assert _tree(ours) == _tree(theirs)
    tree = _tree(ours)
    assert tree["usr/bin/su"] == (0o755, "")  # no setuid bit
    assert tree["usr/bin/shared"] == (0o644, "")  # no group/other write bit
    assert tree["usr/bin"] == (0o755, "")
    assert tree["tmp"] == (0o755, "")  # the sticky bit too (the store sets /tmp's mode)
    assert tree["usr/bin/python"][1] == "/usr/bin/python3.11"  # links into the root stay
    assert tree["etc/hosts"] == (0o644, "")  # a leading / is stripped


@pytest.mark.parametrize(
    ("members", "words"),
    [
        pytest.param([(_entry("../escaped"), b"x")], "outside", id="dot-dot"),
        pytest.param([(_entry("usr/../../escaped"), b"x")], "outside", id="dot-dot-inside-a-path"),
        pytest.param(
            [
                (_entry("out", tarfile.SYMTYPE, 0o777, "OUTSIDE"), b""),
                (_entry("out/planted"), b"x"),
            ],
            "outside",
            id="through-a-symlink",
        ),
        pytest.param(
            [(_entry("passwd", tarfile.LNKTYPE, 0o644, "../outside/secret"), b"")],
            "hard link outside",
            id="hard-link-out",
        ),
    ],
)
def test_an_image_that_would_write_outside_its_root_is_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], words: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host")
    root = tmp_path / "root"
    root.mkdir()
    members = [
        (_entry(i.name, i.type, i.mode, i.linkname.replace("OUTSIDE", str(outside))), c)
        for i, c in members
    ]
    with (
        tarfile.open(fileobj=_archive(members), mode="r|") as archive,
        pytest.raises(tarfile.TarError, match=words),
    ):
        archive.extractall(root, members=tar_filtered(archive, root))
    assert [p.name for p in outside.iterdir()] == ["secret"]
    assert not (tmp_path / "escaped").exists()


def test_an_absolute_hard_link_stays_in_the_root(tmp_path: Path) -> None:
    members = [
        (_entry("etc", tarfile.DIRTYPE, 0o755), b""),
        (_entry("etc/passwd"), b"root:x:0:0\n"),
        (_entry("copy", tarfile.LNKTYPE, 0o644, "/etc/passwd"), b""),
    ]
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(fileobj=_archive(members), mode="r|") as archive:
        archive.extractall(root, members=tar_filtered(archive, root))
    assert (root / "copy").read_text() == "root:x:0:0\n"
    assert (root / "copy").stat().st_ino == (root / "etc/passwd").stat().st_ino
