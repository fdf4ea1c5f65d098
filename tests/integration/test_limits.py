"""Resource attacks end in their own clear error, on time, and leave nothing behind.

Every attack runs on both engines (Docker, and an OCI runtime driven directly), each
twice: in a cold container and in a warm pool slot handed over to the task. All must
end exactly alike: the engine and the pool change how a container is made and when,
never what it enforces. Nothing of the task is left on either engine afterwards.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import docker
import pytest
from helpers import remains

from runner.pipeline import TaskReport
from runner.sandbox.base import Outcome, Stage
from runner.sandbox.labels import LABEL_TASK

from .conftest import PipelineFactory, request

MEMORY_BOMB = """
hog = []
while True:
    hog.append(bytearray(8 * 1024 * 1024))
"""

FORK_BOMB = """
import os
while True:
    os.fork()
"""

THREAD_BOMB = """
import threading, time
threads = []
while True:
    thread = threading.Thread(target=time.sleep, args=(30,))
    thread.start()
    threads.append(thread)
"""

CPU_LOOP_IGNORING_SIGTERM = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    pass
"""

# The agent is stopped, so it cannot enforce the timeout: the host deadline must.
AGENT_FROZEN = """
import os, signal
os.kill(os.getppid(), signal.SIGSTOP)
while True:
    pass
"""

PRINT_FLOOD = """
while True:
    print("x" * 10000)
"""

FD_FLOOD = """
import os
chunk = b"y" * 65536
while True:
    os.write(1, chunk)
    os.write(2, chunk)
"""

TMP_FILL = """
import errno
written = 0
try:
    with open("/tmp/fill", "wb") as handle:
        while True:
            handle.write(b"z" * 65536)
            handle.flush()
            written += 65536
except OSError as exc:
    return {"written": written, "errno": errno.errorcode[exc.errno]}
"""

SEGFAULT = """
import os, signal
os.kill(os.getpid(), signal.SIGSEGV)
"""

SELF_SIGKILL = """
import os, signal
os.kill(os.getpid(), signal.SIGKILL)
"""

# Issue item 5: move into the agent's process group (so that killing the child's
# group misses it), then spin past the timeout. The child now has a session of its
# own, where joining another session's group is refused (EPERM); either way the
# agent must end it and report the timeout itself.
JOIN_AGENT_GROUP = """
import os
try:
    os.setpgid(0, os.getpgid(os.getppid()))
except OSError:
    pass
while True:
    pass
"""

# Issue item 4: the task (same uid as the agent) kills its supervising agent.
KILL_THE_AGENT = """
import os, signal
os.kill(os.getppid(), signal.SIGKILL)
while True:
    pass
"""

# Issue item 1: the task writes its own frame to the result pipe with 300,000 empty
# print entries (about 1 MB).
RESULT_PIPE_PRINT_FLOOD = """
import os
body = b'{"result": "flooded", "print_args": [' + b",".join([b"[]"] * 300_000) + b"]}"
for fd in range(3, 64):
    try:
        os.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"  # the agent reads the first complete frame: the one above
"""

# Run inside a task container under tini, as the agent is: processes that left the
# child's process group (a session of their own, a group of their own, the caller's
# group) all die from one ``stop_task_processes``; the caller and tini do not.
KILL_EVERY_TASK_PROCESS = r"""
import json, os, sys, time
sys.path.insert(0, "/opt/sandbox-agent")
from sandbox_agent.agent import stop_task_processes
pids = []
for how in ("session", "group", "callers-group"):
    pid = os.fork()
    if pid == 0:
        if how == "session":
            os.setsid()
        elif how == "group":
            os.setpgid(0, 0)
        while True:
            time.sleep(1)
    pids.append(pid)
time.sleep(0.3)
stop_task_processes(pids[0], own_pid_namespace=True)
killed = {}
deadline = time.monotonic() + 10
for pid in pids:
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    killed[pid] = bool(reaped) and os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
print(json.dumps({"killed": list(killed.values()), "caller": os.getpid(), "parent": os.getppid()}))
"""


@pytest.fixture(params=["cold", "warm"])
def start(request: pytest.FixtureRequest) -> str:
    """How the task's container is started: created for it, or taken from the pool."""
    mode: str = request.param
    return mode


@pytest.fixture
def pipeline_for(make_task_pipeline: PipelineFactory, start: str) -> PipelineFactory:
    return functools.partial(make_task_pipeline, warm=start == "warm")


def assert_clean(client: docker.DockerClient, report: TaskReport, start: str) -> None:
    assert report.audit["details"]["containerStart"] == start, report.audit["details"]
    left = remains(
        client, container_id=report.audit["containerId"], labels={LABEL_TASK: report.task_id}
    )
    assert left == [], "the task container was left behind"


@pytest.mark.parametrize("guards_off", [False, True], ids=["guards-on", "guards-off"])
async def test_memory_bomb_is_killed_as_out_of_memory(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str, guards_off: bool
) -> None:
    async with pipeline_for(guards_off=guards_off, memory_mb=64) as pipeline:
        report = await pipeline.run(request(MEMORY_BOMB))
    assert report.outcome is Outcome.MEMORY_LIMIT, report.document()
    assert report.error is not None
    assert report.error.message == "Task ran out of memory (limit 64 MiB)"
    assert report.error.stage is Stage.RUN
    assert_clean(docker_client, report, start)


@pytest.mark.parametrize("bomb", [FORK_BOMB, THREAD_BOMB], ids=["fork-bomb", "thread-bomb"])
async def test_process_bombs_hit_the_pids_limit(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str, bomb: str
) -> None:
    async with pipeline_for(guards_off=True, pids_limit=32, task_timeout_s=20) as pipeline:
        report = await pipeline.run(request(bomb))
    # The limit ended it (not the 20 s timeout).
    assert report.outcome is Outcome.PIDS_LIMIT, report.document()
    assert report.error is not None
    assert report.error.message == "Task hit the process limit (32 processes and threads)"
    assert_clean(docker_client, report, start)


async def test_cpu_loop_ignoring_sigterm_dies_on_time(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True, task_timeout_s=2) as pipeline:
        report = await pipeline.run(request(CPU_LOOP_IGNORING_SIGTERM))
    # Killed by the agent at the task's own deadline (SIGKILL after the ignored SIGTERM),
    # not left running until the host's deadline behind it: whose verdict it is says
    # which, where a wall-clock bound would flake on a loaded machine.
    assert report.outcome is Outcome.TIMEOUT, report.document()
    assert report.error is not None
    assert report.error.message == "Task execution timed out after 2 seconds"
    assert report.audit["details"]["verdictSource"] == "agent:deadline", report.audit
    assert_clean(docker_client, report, start)


async def test_host_deadline_kills_a_container_whose_agent_cannot_report(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True, task_timeout_s=1) as pipeline:
        report = await pipeline.run(request(AGENT_FROZEN))
    # The agent cannot report: the host's deadline ends it (and says so), and the
    # container is gone afterwards (assert_clean).
    assert report.outcome is Outcome.TIMEOUT, report.document()
    assert report.error is not None
    assert report.error.message == "Task execution timed out after 1 second"
    assert report.audit["details"]["verdictSource"] == "host:deadline", report.audit
    assert_clean(docker_client, report, start)


async def test_print_flood_ends_in_output_limit(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(output_bytes=1024 * 1024, task_timeout_s=30) as pipeline:
        report = await pipeline.run(request(PRINT_FLOOD))
    assert report.outcome is Outcome.OUTPUT_LIMIT, report.document()
    assert report.error is not None
    assert "output limit of 1048576 bytes" in report.error.message
    # The agent counted the bytes on the result pipe: its verdict, not the child's word.
    assert report.audit["details"]["verdictSource"] == "agent:output_cap"
    # What was captured before the limit is kept, with n8n's truncation marker.
    assert len(report.prints) == 101
    assert report.prints[-1][0].startswith("[Output truncated - ")
    assert_clean(docker_client, report, start)


async def test_stdout_and_stderr_flood_is_capped_and_ends_in_output_limit(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(
        guards_off=True, output_bytes=1024 * 1024, task_timeout_s=30
    ) as pipeline:
        report = await pipeline.run(request(FD_FLOOD))
    assert report.outcome is Outcome.OUTPUT_LIMIT, report.document()
    assert report.error is not None
    assert report.error.message == "Task output exceeded the limit of 1048576 bytes"
    assert report.audit["details"]["stderrBytes"] <= 1024 * 1024 + 2 * 65536 + 16
    assert_clean(docker_client, report, start)


async def test_tmp_fill_stops_at_the_tmpfs_cap(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True, tmpfs_mb=8, fsize_mb=64) as pipeline:
        report = await pipeline.run(request(TMP_FILL))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result["errno"] == "ENOSPC"
    assert 6 * 1024 * 1024 <= report.result["written"] <= 8 * 1024 * 1024
    assert_clean(docker_client, report, start)


async def test_single_file_stops_at_the_file_size_limit(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True, tmpfs_mb=16, fsize_mb=2) as pipeline:
        report = await pipeline.run(request(TMP_FILL))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result["errno"] == "EFBIG"
    assert report.result["written"] <= 2 * 1024 * 1024
    assert_clean(docker_client, report, start)


async def test_crash_by_signal_is_reported_as_a_crash(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True) as pipeline:
        report = await pipeline.run(request(SEGFAULT))
    assert report.outcome is Outcome.CRASHED, report.document()
    assert report.error is not None
    assert report.error.message == "Task process crashed with signal SIGSEGV"
    assert report.error.description.startswith("Fatal Python error: Segmentation fault")
    assert '<all_items_task_execution>", line 3' in report.error.description
    assert "sandbox_agent" not in report.error.description
    assert_clean(docker_client, report, start)


async def test_a_child_dead_of_sigkill_has_the_engine_look_for_its_oom_record(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    # An OOM kill's victim dies of SIGKILL, and an engine's record of the kill can lag
    # (dockerd's, on a loaded host): the engine is asked to look for its own record of
    # one, and without that record the verdict stays a crash.
    async with pipeline_for(guards_off=True) as pipeline:
        sandbox: Any = pipeline.sandbox
        asked: list[bool] = []
        engine_facts = sandbox._exit_facts

        def spy(container: Any, **kw: Any) -> Any:
            asked.append(kw["oom_possible"])
            return engine_facts(container, **kw)

        sandbox._exit_facts = spy
        killed = await pipeline.run(request(SELF_SIGKILL))
        segfault = await pipeline.run(request(SEGFAULT))
    assert killed.outcome is Outcome.CRASHED, killed.document()
    assert killed.error is not None
    assert killed.error.message == "Process was forcefully killed (SIGKILL)"
    assert killed.audit["details"]["oomKilled"] is False
    assert segfault.outcome is Outcome.CRASHED, segfault.document()
    assert asked == [True, False]
    assert_clean(docker_client, killed, start)


async def test_a_task_in_the_agents_process_group_is_timed_out_by_the_agent(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True, task_timeout_s=2) as pipeline:
        report = await pipeline.run(request(JOIN_AGENT_GROUP))
    assert report.outcome is Outcome.TIMEOUT, report.document()
    details = report.audit["details"]
    # The agent's envelope said so (not the host's deadline, 5 s later, which kills
    # the container): a container that exited by itself, and the verdict's source.
    assert details["exitCode"] == 0, details
    assert details.get("verdictSource") == "agent:deadline", details
    assert details["childExitCode"] == -9
    assert_clean(docker_client, report, start)


async def test_a_task_that_kills_its_agent_is_blamed_not_an_outside_stop(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True) as pipeline:
        report = await pipeline.run(request(KILL_THE_AGENT))
    assert report.outcome is Outcome.CRASHED, report.document()
    assert report.error is not None
    assert report.error.message == "Task killed its supervising agent (SIGKILL)"
    details = report.audit["details"]
    assert details["exitCode"] == 137
    # The engine's record holds no kill from outside: Docker's events over the
    # container's life; on the OCI backend, tini's own exit (128 + 9), not PID 1 killed.
    assert details["killedFromOutside"] is False
    assert_clean(docker_client, report, start)


async def test_a_print_flood_on_the_result_pipe_keeps_max_print_calls(
    pipeline_for: PipelineFactory, docker_client: docker.DockerClient, start: str
) -> None:
    async with pipeline_for(guards_off=True) as pipeline:
        report = await pipeline.run(request(RESULT_PIPE_PRINT_FLOOD))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == "flooded"
    assert report.prints == [[]] * 100 + [["[Output truncated - 299900 more print statements]"]]
    assert report.audit["details"]["agentPrintsDropped"] == 299_900
    assert_clean(docker_client, report, start)


def test_the_agents_kill_reaches_every_task_process_but_itself_and_tini(
    docker_client: docker.DockerClient, task_image: str
) -> None:
    # Docker only: about the agent's own function, run in a plain container (no policy,
    # no pipeline); the engine only gives it a PID namespace with tini as PID 1.
    output = docker_client.containers.run(
        task_image,
        entrypoint=["tini", "--", "python3", "-I", "-B", "-c", KILL_EVERY_TASK_PROCESS],
        user="10001:10001",
        network_mode="none",
        remove=True,
    )
    seen = json.loads(output)
    assert seen["killed"] == [True, True, True], seen
    assert seen["parent"] == 1  # tini, still there: it reaped nothing of ours early
