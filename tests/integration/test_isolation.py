"""What a task container really enforces, proven from inside it.

Every probe runs with the in-process guards switched off (all imports allowed, no
builtins denied, environment readable), so what it sees is the container's doing
alone: the wall, not the speed bumps. Each runs on both engines (Docker, and an OCI
runtime driven directly): the same policy must make the same wall.
"""

from __future__ import annotations

import os
from pathlib import Path

import docker
import pytest
from helpers import remains

from runner.sandbox.base import Outcome
from runner.sandbox.labels import LABEL_TASK

from .conftest import PipelineFactory, request

PROBE = r"""
import os, socket, errno

def status_field(name):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()

def try_connect(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect((host, port))
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        sock.close()

def try_write(path):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return "written"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return "ERR " + errno.errorcode.get(exc.errno, str(exc.errno))

return {
    "uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
    "cap_eff": status_field("CapEff"), "cap_prm": status_field("CapPrm"),
    "cap_bnd": status_field("CapBnd"),
    "no_new_privs": status_field("NoNewPrivs"), "seccomp": status_field("Seccomp"),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "connect_public": try_connect("1.1.1.1", 53),
    "connect_gateway": try_connect("172.17.0.1", 2375),
    "write_root": try_write("/probe"),
    "write_etc": try_write("/etc/probe"),
    "write_tmp": try_write("/tmp/probe"),
    "environ": dict(os.environ),
    "proc1_environ": read("/proc/1/environ"),
    "self_environ": read("/proc/self/environ"),
    "pid1_comm": read("/proc/1/comm").strip(),
    "docker_sock": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
    "pid1_mem": try_write("/proc/1/mem"),
    "pid1_stdout": try_write("/proc/1/fd/1"),
    "agent_stdout": try_write(f"/proc/{os.getppid()}/fd/1"),
    "agent_environ": read(f"/proc/{os.getppid()}/environ"),
    "mounts": read("/proc/self/mounts"),
}
"""

CANARY_NAME = "SANDBOX_TEST_CANARY_SECRET"
CANARY_VALUE = "canary-3f9c1e7b-must-never-reach-a-task"
_APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")
HOST_HAS_APPARMOR = _APPARMOR_ENABLED.exists() and _APPARMOR_ENABLED.read_text().strip() == "Y"


@pytest.fixture
def canary(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret in the runner's own environment; no task may ever see it."""
    monkeypatch.setenv(CANARY_NAME, CANARY_VALUE)
    monkeypatch.setenv("N8N_RUNNERS_GRANT_TOKEN", CANARY_VALUE)
    return CANARY_VALUE


async def test_container_enforces_the_isolation_defaults(
    make_task_pipeline: PipelineFactory,
    docker_client: docker.DockerClient,
    canary: str,
) -> None:
    async with make_task_pipeline(guards_off=True) as pipeline:
        report = await pipeline.run(request(PROBE))
    assert report.outcome is Outcome.SUCCESS, report.document()
    facts = report.result

    assert facts["uid"] == 10001
    assert facts["euid"] == 10001
    assert facts["gid"] == 10001
    assert int(facts["cap_eff"], 16) == 0
    assert int(facts["cap_prm"], 16) == 0
    assert int(facts["cap_bnd"], 16) == 0
    assert facts["no_new_privs"] == "1"
    assert facts["seccomp"] == "2"
    assert facts["interfaces"] == ["lo"]
    assert facts["connect_public"] in {"ENETUNREACH", "EHOSTUNREACH", "EPERM", "EACCES"}
    assert facts["connect_gateway"] in {"ENETUNREACH", "EHOSTUNREACH", "EPERM", "EACCES"}
    assert facts["write_root"] == "EROFS"
    assert facts["write_etc"] == "EROFS"
    assert facts["write_tmp"] == "written"
    assert facts["pid1_comm"] == "tini"
    assert facts["docker_sock"] is False
    # PID 1 (tini, execute-only binary) and the agent (non-dumpable) are out of reach of
    # the task's own uid: no memory, no environment, no way onto the result channel.
    assert facts["pid1_mem"] == "EACCES"
    assert facts["pid1_stdout"] == "EACCES"
    assert facts["agent_stdout"] == "EACCES"
    assert facts["agent_environ"] == "ERR EACCES"
    assert facts["proc1_environ"] == "ERR EACCES"
    assert report.audit["details"]["agentUndumpable"] is True

    # The environment: image defaults only, none of the runner's variables.
    assert set(facts["environ"]) <= {"PATH", "HOSTNAME", "LANG", "PYTHONDONTWRITEBYTECODE", "HOME"}
    for text in (str(facts["environ"]), facts["self_environ"]):
        assert canary not in text
        assert "N8N_" not in text
    assert os.environ[CANARY_NAME] == canary  # it was really set in the runner's environment

    # /tmp is the only writable mount, a capped noexec tmpfs; the root is read-only.
    mounts = {line.split()[1]: line.split() for line in facts["mounts"].splitlines()}
    assert mounts["/"][3].startswith("ro")
    tmp_options = mounts["/tmp"][3].split(",")
    assert mounts["/tmp"][2] == "tmpfs"
    assert {"rw", "noexec", "nosuid", "nodev"} <= set(tmp_options)

    audit = report.audit
    assert audit["isolation"]["seccomp"]["sha256"]
    # Judged from the kernel itself, not from the runner's own detection.
    if HOST_HAS_APPARMOR:
        assert audit["isolation"]["apparmor"] == "sandbox-task"
    else:
        assert audit["isolation"]["apparmor"].startswith("unavailable")
    left = remains(
        docker_client, container_id=audit["containerId"], labels={LABEL_TASK: report.task_id}
    )
    assert left == []


async def test_runner_environment_never_reaches_task_even_with_env_access_allowed(
    make_task_pipeline: PipelineFactory, canary: str
) -> None:
    code = (
        "import os\n"
        "found = []\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        for name in ('environ', 'cmdline'):\n"
        "            try:\n"
        "                with open(f'/proc/{pid}/{name}', 'rb') as h:\n"
        "                    found.append(h.read().decode('latin-1'))\n"
        "            except OSError: pass\n"
        "return {'env': dict(os.environ), 'proc': found}\n"
    )
    async with make_task_pipeline(guards_off=True) as pipeline:
        report = await pipeline.run(request(code))
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert canary not in str(report.result)
    assert report.result["proc"], "the probe must have read at least its own /proc entries"


PROBE_FILE = Path(__file__).parent / "probes" / "syscall_probe.py"


async def test_seccomp_profile_refuses_every_listed_call_and_allows_what_python_needs(
    make_task_pipeline: PipelineFactory,
) -> None:
    """Runs the kernel-policy probe as a task (guards off) through the real pipeline."""
    # A task is a function body: a __future__ import cannot be part of it.
    source = PROBE_FILE.read_text().replace("from __future__ import annotations", "")
    code = source + "\nreturn run_probes()\n"
    async with make_task_pipeline(guards_off=True) as pipeline:
        report = await pipeline.run(request(code))
    assert report.outcome is Outcome.SUCCESS, report.document()
    probes = report.result
    assert len(probes) > 100
    failed = {name: result for name, result in probes.items() if not result["ok"]}
    assert failed == {}
    for required in (
        "syscall.io_uring_setup",
        "syscall.bpf",
        "syscall.ptrace",
        "clone.CLONE_NEWUSER",
        "syscall.clone3",
        "socket.AF_PACKET",
        "abi.i386_int80",
        "works.threads",
    ):
        assert any(name.startswith(required) for name in probes), required
