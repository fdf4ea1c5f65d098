"""The OCI backend on this host: a runtime (runc) driven directly, no daemon per task.

- The config we write is the one Docker's daemon generates for the same policy and
  limits, daemon-specific parts aside (its network hook, its /etc binds, its cgroup
  path, its root path): the two backends cannot drift.
- How a container ended is the host's word: the OOM kill from the memory cgroup's
  counter, who killed PID 1 from its wait status; nothing of a container is left after
  any outcome (bundle, runtime state, cgroups), and a runner killed with SIGKILL leaves
  leftovers that the next start of its runner id sweeps.
- The gVisor tier (runsc) runs the same tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import remains, until

from runner.cli.wiring import make_oci_sandbox, oci_runtime
from runner.errors import ContainerSetupError
from runner.pipeline import TaskPipeline
from runner.sandbox.base import Outcome
from runner.sandbox.docker import DockerSandbox
from runner.sandbox.oci import cgroups
from runner.sandbox.oci import runtime as oci_runtime_module
from runner.sandbox.oci import sandbox as oci_sandbox
from runner.sandbox.oci.config import NETWORK_NONE_SYSCTL, etc_binds, etc_files, render
from runner.sandbox.oci.rootfs import RootfsStore, image_config
from runner.sandbox.oci.runtime import OciRuntime
from runner.sandbox.oci.sandbox import OciSandbox
from runner.sandbox.spec import container_spec
from runner.settings import Settings

from .conftest import PipelineFactory, pipeline_factory, request

pytestmark = pytest.mark.timeout(300)

DOCKER_STATE = Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby")
# dockerd binds these from its state directory, ours from the runner's state directory
# (the same files, as etc_files makes them); the resolver's it binds, ours does not.
ETC_BINDS = {"/etc/hostname", "/etc/hosts"}
DOCKERD_ONLY_BINDS = {"/etc/resolv.conf"}


def oci_of(pipeline: TaskPipeline) -> OciSandbox:
    sandbox = pipeline.sandbox
    assert isinstance(sandbox, OciSandbox)
    return sandbox


def assert_nothing_left(sandbox: OciSandbox, container_id: str | None) -> None:
    assert container_id
    runtime = sandbox.runtime
    assert runtime.state(container_id) is None, "the runtime still knows the container"
    assert not (state_dir_of(sandbox) / "bundles" / container_id).exists(), "bundle left"
    assert cgroups.oom_kills(cgroups.path_of("pytest-runner", container_id)) is None, "cgroup left"
    # And in every hierarchy (a hybrid host's v2 tree too), under any runner id.
    assert remains(None, container_id=container_id, state_dir=state_dir_of(sandbox)) == []


def state_dir_of(sandbox: OciSandbox) -> Path:
    return sandbox.runtime.root.parent


def bound_files(config: dict[str, Any]) -> dict[str, str]:
    """What the files dockerd binds over /etc/hosts and /etc/hostname hold."""
    return {
        m["destination"]: Path(m["source"]).read_text()
        for m in config["mounts"]
        if m["destination"] in ETC_BINDS
    }


@pytest.fixture
def make_oci_pipeline(base_settings: Settings, task_image: str) -> PipelineFactory:
    return pipeline_factory(base_settings, task_image, backend="oci")


# -- one spec, two renderings ---------------------------------------------------------------


async def test_the_oci_config_is_what_docker_generates_for_the_same_policy(
    make_docker_pipeline: PipelineFactory, base_settings: Settings, task_image: str
) -> None:
    """Every field Docker puts in a task container's config.json, ours puts too, with
    the same value (the binds of /etc/hosts and /etc/hostname, and what they hold,
    too); what differs is the daemon's own (and defaultErrnoRet, which Docker 20.10
    drops: runc's default errno for SCMP_ACT_ERRNO is EPERM, the profile's 1)."""
    async with make_docker_pipeline(warm=True, memory_mb=96, cpus=0.5, pids_limit=48) as pipeline:
        sandbox = pipeline.sandbox
        assert isinstance(sandbox, DockerSandbox)
        assert sandbox.pool is not None
        (slot,) = sandbox.pool.idle_resources()
        theirs = json.loads((DOCKER_STATE / slot.container_id / "config.json").read_text())
        bound = bound_files(theirs)
        limits = pipeline.limits
        isolation = sandbox.isolation
    client = docker.from_env()
    try:
        attrs = client.api.inspect_image(task_image)
    finally:
        client.close()
    ours = render(
        container_spec(isolation, limits),
        image_config(attrs),
        rootfs="ROOT",
        cgroups_path="CGROUP",
        machine=platform.machine(),
        kernel_release=platform.release(),
        extra_mounts=etc_binds("ETC"),
    )
    # The daemon's own parts.
    theirs.pop("hooks", None)
    theirs["root"]["path"] = "ROOT"
    theirs["linux"]["cgroupsPath"] = "CGROUP"
    theirs["mounts"] = [m for m in theirs["mounts"] if m["destination"] not in DOCKERD_ONLY_BINDS]
    for mount in theirs["mounts"]:
        if mount["destination"] in ETC_BINDS:
            name = mount["destination"].removeprefix("/etc/")
            assert bound[mount["destination"]] == etc_files("sandbox")[name], name
            mount["source"] = f"ETC/{name}"
    assert ours["linux"]["seccomp"].pop("defaultErrnoRet") == 1
    assert "defaultErrnoRet" not in theirs["linux"]["seccomp"]
    # What dockerd's network hook does itself (IPv6 off), ours says as sysctls.
    for name in NETWORK_NONE_SYSCTL:
        assert ours["linux"]["sysctl"].pop(name) == "1"
    assert ours == theirs


# -- outcomes, from the host --------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_outcomes_on_the_oci_backend_leave_nothing(
    make_oci_pipeline: PipelineFactory, warm: bool
) -> None:
    cases: list[tuple[str, dict[str, Any], Outcome]] = [
        ("return [{'json': {'n': len(_items)}}]", {}, Outcome.SUCCESS),
        ("raise ValueError('bad')", {}, Outcome.USER_ERROR),
        ("while True:\n    pass", {"task_timeout_s": 2}, Outcome.TIMEOUT),
        ("x = bytearray(512 * 1024 * 1024)", {"memory_mb": 64}, Outcome.MEMORY_LIMIT),
        ("return 'x' * 3_000_000", {"output_bytes": 1_000_000}, Outcome.OUTPUT_LIMIT),
    ]
    for code, overrides, expected in cases:
        async with make_oci_pipeline(guards_off=True, warm=warm, **overrides) as pipeline:
            report = await pipeline.run(request(code, [{"json": {}}]))
            sandbox = oci_of(pipeline)
        assert report.outcome is expected, report.document()
        assert report.audit["details"]["containerStart"] == ("warm" if warm else "cold")
        assert_nothing_left(sandbox, report.audit["containerId"])


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_task_costs_one_runtime_command(
    make_oci_pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    """Its ``run``: PID 1 is killed through its pidfd and, once reaped, runc's state is
    removed without runc (each runtime command is a Go process: ~6 ms of CPU)."""
    commands: list[str] = []
    argv = OciRuntime.argv

    def recording(self: OciRuntime, *args: str) -> list[str]:
        commands.append(args[0])
        return argv(self, *args)

    async with make_oci_pipeline(warm=warm) as pipeline:
        sandbox = oci_of(pipeline)
        assert sandbox.runtime.kind == "runc"
        if warm:
            assert sandbox.pool is not None
            await sandbox.warm_up(wait=True)
        await sandbox.wait_removals()
        monkeypatch.setattr(OciRuntime, "argv", recording)
        report = await pipeline.run(request("return [{'json': {'n': 1}}]"))
        await sandbox.wait_removals()
        if warm:
            await sandbox.warm_up(wait=True)  # the refill: one `run` more
        monkeypatch.undo()
    assert report.result == [{"json": {"n": 1}}], report.document()
    assert commands == ["run"], commands
    assert_nothing_left(sandbox, report.audit["containerId"])


class RunFaults:
    """The runtime's ``run`` commands, with faults on the first ``times`` of them: an
    OSError the kernel gives a fork under pressure (``errno``), or a runtime that
    answers with an error (``said``, exit 1) instead of starting the container."""

    def __init__(self, *, times: int, errno_: int | None = None, said: str = "") -> None:
        self.times, self.errno, self.said = times, errno_, said
        self.runs: list[str] = []  # container ids, in order
        self.popen = subprocess.Popen

    def __call__(self, argv: list[str], **kwargs: Any) -> Any:
        if "run" not in argv:
            return self.popen(argv, **kwargs)
        self.runs.append(argv[-1])
        if len(self.runs) <= self.times:
            if self.errno is not None:
                raise OSError(self.errno, os.strerror(self.errno))
            argv = ["sh", "-c", f"echo {self.said!r} >&2; exit 1"]
        return self.popen(argv, **kwargs)


async def test_a_set_up_fault_of_the_runtime_is_retried_and_user_code_never(
    make_oci_pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork refused for lack of resources (EAGAIN) is retried with back-off, told to
    the service's metrics as its cause; a task that fails on its own is never re-run."""
    faults = RunFaults(times=2, errno_=errno.EAGAIN)
    causes: list[str] = []
    async with make_oci_pipeline(setup_attempts=3, setup_backoff_max_s=0.2) as pipeline:
        sandbox = oci_of(pipeline)
        sandbox.on_retry = causes.append
        monkeypatch.setattr(oci_runtime_module.subprocess, "Popen", faults)
        report = await pipeline.run(request("return [{'json': {'n': 1}}]"))
        failed = await pipeline.run(request("raise ValueError('mine')"))
        await sandbox.wait_removals()
        monkeypatch.undo()
    assert report.result == [{"json": {"n": 1}}], report.document()
    assert causes == ["runtime_error", "runtime_error"]
    assert failed.outcome is Outcome.USER_ERROR, failed.document()
    assert len(faults.runs) == 4, faults.runs  # 2 refused + the task's + the user error's
    for container_id in faults.runs:
        assert remains(None, container_id=container_id, state_dir=state_dir_of(sandbox)) == []


async def test_a_runtime_that_refuses_the_container_is_not_retried(
    make_oci_pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's own error (it answered, with an error) is no fault of the moment:
    one attempt, a clear ContainerSetupError carrying what the runtime said, and
    nothing of the container left (bundle, runtime state, cgroups)."""
    faults = RunFaults(times=1, said="runc: simulated: container_linux.go: cgroup busy")
    async with make_oci_pipeline(setup_attempts=3, setup_backoff_max_s=0.2) as pipeline:
        sandbox = oci_of(pipeline)
        monkeypatch.setattr(oci_runtime_module.subprocess, "Popen", faults)
        with pytest.raises(ContainerSetupError, match="could not") as refused:
            await pipeline.run(request("return 1"))
        await sandbox.wait_removals()
        monkeypatch.undo()
        after = await pipeline.run(request("return 1"))  # and it keeps serving
    assert "simulated: container_linux.go: cgroup busy" in (refused.value.hint or "")
    assert sandbox.retries_logged == 0
    assert len(faults.runs) == 1, faults.runs
    assert remains(None, container_id=faults.runs[0], state_dir=state_dir_of(sandbox)) == []
    assert after.outcome is Outcome.SUCCESS, after.document()


async def test_a_task_that_kills_its_agent_is_blamed_and_an_outside_kill_is_not(
    make_oci_pipeline: PipelineFactory,
) -> None:
    kill_agent = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nwhile True:\n    pass"
    async with make_oci_pipeline(guards_off=True) as pipeline:
        blamed = await pipeline.run(request(kill_agent))
        sandbox = oci_of(pipeline)
        spin = asyncio.create_task(pipeline.run(request("import time\ntime.sleep(30)")))
        await until(lambda: sandbox._containers, 20, "the container")
        await asyncio.sleep(1.0)  # the agent is up: its PID 1 is what an operator kills
        (container,) = sandbox._containers.values()
        os.kill(container.pid, signal.SIGKILL)  # an operator on the host
        outside = await spin
    assert blamed.error is not None
    assert "Task killed its supervising agent" in blamed.error.message, blamed.document()
    assert outside.error is not None
    assert "killed" in outside.error.message
    assert outside.audit["details"]["killedFromOutside"] is True, outside.document()


async def test_cancel_kills_the_container(make_oci_pipeline: PipelineFactory) -> None:
    async with make_oci_pipeline(guards_off=True) as pipeline:
        sandbox = oci_of(pipeline)
        task = request("import time\ntime.sleep(30)")
        running = asyncio.create_task(pipeline.run(task))
        await until(lambda: sandbox._containers, 20, "the container")
        await sandbox.cancel(task.task_id)
        report = await running
    assert report.outcome is Outcome.CANCELLED
    assert_nothing_left(sandbox, report.audit["containerId"])


# -- a runner killed with SIGKILL --------------------------------------------------------------

LEAVE_A_SLOT = """
import asyncio, sys
import docker
from runner.cli.wiring import make_oci_sandbox, oci_runtime
from runner.settings import Settings
settings = Settings(runner_id=sys.argv[1], pool_size=1, state_dir=sys.argv[2])
sandbox = make_oci_sandbox(settings, docker.from_env(), oci_runtime(settings), image=sys.argv[3])
async def main():
    await sandbox.warm_up(wait=True)
    print(next(iter(sandbox._containers)), flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_a_runner_killed_with_sigkill_leaves_leftovers_the_next_start_sweeps(
    task_image: str, tmp_path: Path
) -> None:
    runner_id = f"pytest-oci-{os.getpid()}"
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-c", LEAVE_A_SLOT, runner_id, str(state), task_image],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    container_id = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    settings = Settings(runner_id=runner_id, pool_size=0, state_dir=state)
    runtime = oci_runtime(settings)
    assert isinstance(runtime, OciRuntime)
    assert runtime.state(container_id) is not None  # left running by the dead runner
    assert (state / "bundles" / container_id).is_dir()
    client = docker.from_env()
    try:
        sandbox = make_oci_sandbox(settings, client, runtime, image=task_image, warm_pool=False)
        removed = asyncio.run(sandbox.sweep())
        asyncio.run(sandbox.aclose())
    finally:
        client.close()
    assert container_id in removed
    assert runtime.state(container_id) is None
    assert not (state / "bundles" / container_id).exists()
    assert cgroups.leftover_containers(runner_id) == []


def test_a_sweep_removes_what_only_dead_containers_kept(
    task_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cgroups a removal left half-done (another runner's, no bundle, no runtime state),
    per-runner parents left empty, and unpacked roots no container names and no live
    runner leases; the root of the runner's own image stays (no second unpack)."""
    state = tmp_path / "state"
    settings = Settings(runner_id=f"pytest-sweep-{os.getpid()}", pool_size=0, state_dir=state)
    runtime = oci_runtime(settings)
    assert isinstance(runtime, OciRuntime)
    other = f"pytest-dead-{os.getpid()}"
    if cgroups.layout() == "v2":
        orphan = [cgroups.ROOT / cgroups.PARENT / other / "sbx-orphan"]
    else:
        orphan = [
            hierarchy / cgroups.PARENT / other / "sbx-orphan"
            for hierarchy in (cgroups.ROOT / name for name in ("memory", "pids", "unified"))
            if (hierarchy / "cgroup.procs").exists()
        ]
    for directory in orphan:
        directory.mkdir(parents=True)  # a real cgroup: the kernel fills it
    # Another runner's container that is alive, seen from a runner with another state
    # directory: no bundle or runtime state of ours names it, and it must live on.
    alive = [d.parent.parent / f"pytest-alive-{os.getpid()}" / "sbx-alive" for d in orphan]
    for directory in alive:
        directory.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    for directory in alive:
        (directory / "cgroup.procs").write_text(str(sleeper.pid))
    client = docker.from_env()
    try:
        store = RootfsStore(state / "rootfs", client, task_uid=10001)
        ours = store.ensure(task_image).path
        store.release()  # as at a runner's start: it sweeps before it leases
        inode = ours.stat().st_ino
        old = state / "rootfs" / "v2-0123456789abcdef"
        (old / "usr/bin").mkdir(parents=True)
        monkeypatch.setattr(oci_sandbox, "RECORD_GRACE_S", 0.0)
        time.sleep(0.05)  # the orphan's cgroups are older than the (zero) grace
        sandbox = make_oci_sandbox(settings, client, runtime, image=task_image, warm_pool=False)
        removed = asyncio.run(sandbox.sweep())
        asyncio.run(sandbox.aclose())
        still_running = sleeper.poll() is None
        alive_left = [d for d in alive if d.is_dir()]
        parents_left = [d.parent for d in orphan if d.parent.exists()]
    finally:
        client.close()
        sleeper.kill()
        sleeper.wait()
        for directory in [*orphan, *alive]:
            with contextlib.suppress(OSError):
                directory.rmdir()
            with contextlib.suppress(OSError):
                directory.parent.rmdir()
    assert "sbx-orphan" in removed
    assert [d for d in orphan if d.exists()] == []
    assert still_running, "the sweep killed a live container of another runner"
    assert alive_left == alive, "the sweep removed a live container's cgroup"
    assert parents_left == [], "an empty parent is left"
    assert not old.exists()
    assert ours.stat().st_ino == inode, "our image's root was removed (and unpacked again)"


# -- gVisor ---------------------------------------------------------------------------------


async def test_the_gvisor_tier_runs_the_same_tasks(
    base_settings: Settings, task_image: str
) -> None:
    factory = pipeline_factory(base_settings, task_image, backend="oci")
    async with factory(oci_runtime="runsc") as pipeline:
        sandbox = oci_of(pipeline)
        assert sandbox.runtime.kind == "runsc"
        ok = await pipeline.run(request("return [{'json': {'n': sum(range(10))}}]"))
        failed = await pipeline.run(request("raise ValueError('under gVisor')"))
    assert ok.result == [{"json": {"n": 45}}], ok.document()
    assert failed.error is not None
    assert failed.error.message == "under gVisor"
    assert_nothing_left(sandbox, ok.audit["containerId"])
