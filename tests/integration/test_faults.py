"""Lifecycle faults against the real engines: the runner killed, the Docker daemon
restarted, a task container killed from outside, all in the middle of running tasks.

Each test asserts what every task ended with (its code, exactly one completion on
the wire or none), that the runner serves the next task by itself, and that no
container of ours is left. The runner killed and the container killed from outside
run on both engines (Docker, and an OCI runtime driven directly, whose containers
outlive a killed runner differently: their PID 1 is that runner's child). The daemon
restart is Docker's alone (the OCI backend has no daemon on the task path); it uses
a private second daemon (:mod:`.private_docker`): the machine's main daemon serves
other tests meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import engine_containers, oci_state_dir, remains, until

from runner.broker_server.core import BrokerTask
from runner.sandbox.base import Outcome, Stage
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.labels import LABEL_MANAGED, LABEL_OWNER, LABEL_PROCESS
from runner.sandbox.oci.sandbox import OciSandbox

from .conftest import PipelineFactory, request
from .harness import RunnerProcess, completions, finished, start_broker, submit
from .private_docker import PrivateDockerd, PrivateDockerdError

LONG_TASK = "import time\ntime.sleep(30)\nreturn {n}"


def running_user_code(client: docker.DockerClient, owner: str) -> int:
    """How many of the owner's containers run user code right now, on either engine.

    A container's processes are tini, the agent under it and, once the agent read its
    task, the child the agent forked to run the user's code: a grandchild of tini.
    An idle warm pool slot has none (its ``pool`` task label stays on after the
    hand-over, so labels cannot tell). Seen from the daemon (``docker top``), and for
    the OCI backend from the host's process table, under the PID 1 its bundle names.
    """
    count = 0
    for container in client.api.containers(
        filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
    ):
        try:
            top = client.api.top(container["Id"], ps_args="-o pid,ppid")
        except docker.errors.APIError:
            continue  # it stopped or went away between the listing and here
        pids, ppids = top["Titles"].index("PID"), top["Titles"].index("PPID")
        parent = {row[pids]: row[ppids] for row in top["Processes"] or []}
        if any(parent.get(ppid) in parent for ppid in parent.values()):
            count += 1
    bundles = oci_state_dir() / "bundles"
    host_parent = host_process_parents()
    for container_id in engine_containers(client, {LABEL_OWNER: owner}):
        try:
            tini = int((bundles / container_id / "pid").read_text())
        except (OSError, ValueError):
            continue  # a Docker container, or one not started yet, or gone
        agents = {pid for pid, ppid in host_parent.items() if ppid == tini}
        if any(ppid in agents for ppid in host_parent.values()):
            count += 1
    return count


def host_process_parents() -> dict[int, int]:
    """Every process on the host: its pid -> its parent's."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it exited meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    return parent


async def until_running(
    tasks: list[BrokerTask], client: docker.DockerClient, owner: str, timeout_s: float = 60
) -> None:
    """Until the runner accepted every task and each one's user code runs in its container."""
    await until(lambda: all(t.status == "running" for t in tasks), 30, "the tasks to start")
    deadline = time.monotonic() + timeout_s
    while (found := await asyncio.to_thread(running_user_code, client, owner)) < len(tasks):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s: user code runs in {found} of "
                f"{len(tasks)} containers"
            )
        await asyncio.sleep(0.1)
    assert found == len(tasks)


# -- the runner process killed ------------------------------------------------------------


async def test_a_runner_killed_mid_tasks_leaves_no_container_after_its_restart(
    docker_client: docker.DockerClient, task_image: str, backend: str
) -> None:
    owner = f"pytest-fault-kill-{uuid.uuid4().hex[:8]}"
    env = {
        "SANDBOX_RUNNER_ID": owner,
        "N8N_RUNNERS_MAX_CONCURRENCY": "3",
        "N8N_RUNNERS_TASK_TIMEOUT": "30",
        "SANDBOX_BACKEND": backend,
    }
    async with start_broker() as running:
        core = running.broker
        core.log_messages = True
        # The killed runner never comes back under its id: say so after 1 s, not 30.
        core.config = replace(core.config, runner_lost_grace_s=1.0)
        first = RunnerProcess(running.url, env)
        try:
            await first.wait_connected(core)
            tasks = [submit(core, LONG_TASK.format(n=n)) for n in range(3)]
            await until_running(tasks, docker_client, owner)
            left_behind = set(engine_containers(docker_client, {LABEL_OWNER: owner}))
            # Three task containers, plus whatever warm pool slots were idle.
            assert len(left_behind) >= 3
            first.process.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first.process.wait, 10) == -signal.SIGKILL
        finally:
            first.stop()
        documents = await asyncio.gather(*(finished(t, 30) for t in tasks))
        assert [d["error"]["code"] for d in documents] == ["runner_lost"] * 3
        for task in tasks:
            assert completions(core, task.task_id) == []  # the dead runner said nothing
        # Precondition of the sweep: the dead runner's containers are all still there.
        before_restart = set(engine_containers(docker_client, {LABEL_OWNER: owner}))
        assert left_behind <= before_restart

        second = RunnerProcess(running.url, env)
        try:
            # The start-up sweep runs before the runner registers with the broker.
            await second.wait_connected(core)
            remaining = engine_containers(docker_client, {LABEL_OWNER: owner})
            assert before_restart.isdisjoint(remaining), second.output
            for container_id in before_restart:
                assert remains(docker_client, container_id=container_id) == [], second.output
            pid_prefix = f"{second.process.pid}:"
            # Only the new process's own warm pool slots may exist now.
            assert all(
                labels[LABEL_PROCESS].startswith(pid_prefix) for labels in remaining.values()
            )
            assert f"swept {len(before_restart)} leftover task container(s)" in second.output
            after = submit(core, "return 'after'")
            assert (await finished(after))["result"] == "after"
            assert len(completions(core, after.task_id)) == 1
        finally:
            assert await second.aclose() == 0, second.output
    assert remains(docker_client, labels={LABEL_OWNER: owner}) == []


# -- the Docker daemon restarted -------------------------------------------------------------


@pytest.fixture
def private_dockerd(
    docker_client: docker.DockerClient, task_image: str
) -> Iterator[PrivateDockerd]:
    """A private daemon with the task image loaded; stopped and removed afterwards.

    It must not touch the host's network: the main daemon's `docker0` is there after
    it as before (a private dockerd in the host's namespace deletes it).
    """
    links_before = host_links()
    try:
        daemon = PrivateDockerd()
    except PrivateDockerdError as exc:
        pytest.fail(f"cannot prepare a private Docker daemon: {exc}", pytrace=False)
    with daemon:
        try:
            daemon.start()
        except PrivateDockerdError as exc:
            pytest.fail(f"cannot start a private Docker daemon: {exc}", pytrace=False)
        daemon.load_images(docker_client, task_image)
        yield daemon
    assert links_before <= host_links(), "the private daemon removed a link"


def host_links() -> set[str]:
    """The host's network links but the veth pairs of containers, which come and go
    with other containers on the host (other tests' with a network) meanwhile."""
    return {link for link in os.listdir("/sys/class/net") if not link.startswith("veth")}


async def test_a_docker_daemon_restart_fails_running_tasks_clearly_and_the_runner_recovers(
    private_dockerd: PrivateDockerd, task_image: str
) -> None:
    daemon = private_dockerd
    client = daemon.client()
    owner = f"pytest-fault-daemon-{uuid.uuid4().hex[:8]}"
    env = {
        "DOCKER_HOST": daemon.host,
        "SANDBOX_IMAGE": task_image,
        "SANDBOX_RUNNER_ID": owner,
        "N8N_RUNNERS_MAX_CONCURRENCY": "3",
        "N8N_RUNNERS_TASK_TIMEOUT": "30",
        # Enough set-up attempts (at most 1 s apart) to outlast the restart.
        "SANDBOX_SETUP_ATTEMPTS": "15",
        "SANDBOX_SETUP_BACKOFF_MAX_S": "1",
        "SANDBOX_BACKEND": "docker",  # the daemon that restarts is the one making containers
    }
    try:
        async with start_broker() as running:
            core = running.broker
            core.log_messages = True
            runner = RunnerProcess(running.url, env)
            try:
                await runner.wait_connected(core, timeout_s=90)  # includes the self-check
                long_tasks = [submit(core, LONG_TASK.format(n=n)) for n in range(2)]
                await until_running(long_tasks, client, owner)

                await asyncio.to_thread(daemon.stop)
                # A task accepted while the daemon is down has not started its code:
                # its container set-up is retried until the daemon is back.
                during = submit(core, "return 'set up after the restart'")
                await until(lambda: during.status == "running", 10, "the runner to accept it")
                await until(
                    lambda: "container set-up failed (attempt 1 of 15), retrying" in runner.output,
                    30,
                    "a container set-up to fail while the daemon is down",
                )
                await asyncio.to_thread(daemon.start)

                documents = await asyncio.gather(*(finished(t, 30) for t in long_tasks))
                for task, document in zip(long_tasks, documents, strict=True):
                    assert document["status"] == "error", document
                    assert document["error"]["code"] == "docker_unavailable"
                    assert document["error"]["stage"] == Stage.RUN.value
                    assert document["error"]["message"] == (
                        "Task could not be run: The Docker daemon went away while the task "
                        "was running"
                    )
                    assert "was not retried" in document["error"]["description"]
                    assert len(completions(core, task.task_id)) == 1
                assert (await finished(during, 60))["result"] == "set up after the restart"
                assert len(completions(core, during.task_id)) == 1
                assert "container set-up failed (attempt 1 of 15), retrying" in runner.output

                # The same process serves the next tasks, warm pool and all.
                for n in range(3):
                    nxt = submit(core, f"return {n}")
                    assert (await finished(nxt, 30))["result"] == n
                assert runner.process.poll() is None
            finally:
                assert await runner.aclose() == 0, runner.output
        # Containers the restart took down were removed once the daemon was back.
        assert client.api.containers(all=True) == [], runner.output
    finally:
        client.close()


# -- a task container killed from outside --------------------------------------------------


def kill_from_outside(
    sandbox: ContainerSandbox[Any], client: docker.DockerClient, cid: str
) -> None:
    """What an operator does: ``docker kill``, or the OCI runtime's own ``kill``."""
    if isinstance(sandbox, OciSandbox):
        runtime = sandbox.runtime
        subprocess.run([runtime.path, "--root", str(runtime.root), "kill", cid, "KILL"], check=True)
    else:
        client.api.kill(cid)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_task_container_killed_from_outside_is_a_crash_and_nothing_leaks(
    make_task_pipeline: PipelineFactory, docker_client: docker.DockerClient, warm: bool
) -> None:
    async with make_task_pipeline(warm=warm) as pipeline:
        sandbox = pipeline.sandbox
        assert isinstance(sandbox, ContainerSandbox)
        task = request("import time\ntime.sleep(30)\nreturn 1")
        run = asyncio.create_task(pipeline.run(task))
        container_id = await until(lambda: sandbox._running.get(task.task_id), 20, "the task")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(kill_from_outside, sandbox, docker_client, container_id)
        report = await asyncio.wait_for(run, 20)
        assert report.outcome is Outcome.CRASHED
        assert report.error is not None
        assert report.error.message == "Task container was killed by SIGKILL"
        assert report.error.stage is Stage.RUN
        assert report.audit["details"]["exitCode"] == 128 + signal.SIGKILL
        assert report.audit["details"]["killedFromOutside"] is True
        assert report.audit["details"]["containerStart"] == ("warm" if warm else "cold")
        await sandbox.wait_removals()
        assert remains(docker_client, container_id=container_id) == []
        after = await pipeline.run(request("return 2"))
        assert after.result == 2
