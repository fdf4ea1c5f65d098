"""``sandbox-runner exec`` as a user runs it: one JSON document, honest exit codes; and
``sandbox-runner up`` (the embedded broker and a runner) serving tasks over HTTP.

Every task runs on both engines (``SANDBOX_BACKEND``: Docker, and an OCI runtime
driven directly), and its audit record says which ran it. The usage, configuration
and infrastructure errors stop before any engine is chosen: they run once.
(``serve`` on both engines: test_broker_e2e.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import httpx
import pytest
from helpers import remains, sandbox_runner

from runner.cli.wiring import oci_runtime
from runner.sandbox.labels import LABEL_OWNER
from runner.settings import PROJECT_ROOT, Settings
from runner.testing import UpProcess


@pytest.fixture
def on_engine(task_image: str, backend: str) -> dict[str, str]:
    """The environment that runs ``exec`` on the ``backend`` fixture's engine."""
    return {"SANDBOX_BACKEND": backend}


def test_exec_success_prints_one_json_document(on_engine: dict[str, str], backend: str) -> None:
    done = sandbox_runner(
        "exec",
        "-",
        "--items",
        '[{"a": 1}, {"json": {"a": 2}}]',
        stdin="return [{'json': {'sum': sum(i['json']['a'] for i in _items)}}]",
        env=on_engine,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["status"] == "success"
    assert document["result"] == [{"json": {"sum": 3}}]
    assert document["prints"] == []
    audit = document["audit"]
    assert audit["isolation"]["backend"] == backend
    assert audit["containerId"]
    assert audit["imageId"].startswith("sha256:")
    assert audit["isolation"]["seccomp"]["sha256"]
    assert audit["limits"]["memoryBytes"] == 256 * 1024 * 1024
    for phase in ("analyze", "create", "start", "containerSetup", "run", "total"):
        assert phase in audit["durationsMs"], phase


@pytest.mark.usefixtures("task_image")
def test_exec_on_auto_takes_the_oci_backend_where_it_can_run() -> None:
    # The default (SANDBOX_BACKEND=auto): the OCI backend with runc wherever it can run
    # (root, writable cgroups, runc installed: this project's reference machine), else
    # Docker, saying why. Whether it can is judged here by the same host checks.
    can_run = not isinstance(oci_runtime(Settings(oci_runtime="runc")), str)
    done = sandbox_runner("exec", "-", stdin="return 1")
    assert done.returncode == 0, done.stderr
    engine = json.loads(done.stdout)["audit"]["isolation"]
    if can_run:
        assert engine["backend"] == "oci", done.stderr
        assert engine["runtime"].startswith("runc version "), engine
    else:
        assert engine["backend"] == "docker"
        assert "the OCI backend cannot run here" in done.stderr


def test_exec_per_item_mode_from_files(tmp_path: Path, on_engine: dict[str, str]) -> None:
    code = tmp_path / "task.py"
    code.write_text("return None if _item['json']['n'] % 2 else {'n': _item['json']['n']}")
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"n": n} for n in range(4)]))
    done = sandbox_runner(
        "exec", str(code), "--items", str(items), "--mode", "per_item", env=on_engine
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == [
        {"json": {"n": 0}, "pairedItem": {"item": 0}},
        {"json": {"n": 2}, "pairedItem": {"item": 2}},
    ]


def test_exec_task_error_exits_1_with_the_error_document(on_engine: dict[str, str]) -> None:
    done = sandbox_runner("exec", "-", stdin="print('x')\nraise ValueError('nope')", env=on_engine)
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["status"] == "error"
    assert document["error"]["message"] == "nope"
    assert document["error"]["code"] == "user_error"
    assert document["prints"] == [["'x'"]]


def test_exec_timeout_flag_and_n8n_variable(on_engine: dict[str, str]) -> None:
    flag = sandbox_runner(
        "exec", "-", "--timeout", "1", stdin="while True:\n    pass", env=on_engine
    )
    assert flag.returncode == 1
    assert json.loads(flag.stdout)["error"]["message"] == "Task execution timed out after 1 second"
    env = sandbox_runner(
        "exec",
        "-",
        stdin="while True:\n    pass",
        env={**on_engine, "N8N_RUNNERS_TASK_TIMEOUT": "2"},
    )
    assert json.loads(env.stdout)["error"]["message"] == "Task execution timed out after 2 seconds"


def test_exec_honours_allowlist_variables(on_engine: dict[str, str]) -> None:
    code = "import os\nreturn len(os.environ)"
    blocked = sandbox_runner("exec", "-", stdin=code, env=on_engine)
    assert json.loads(blocked.stdout)["error"]["message"] == "Security violations detected"
    allowed = sandbox_runner(
        "exec", "-", stdin=code, env={**on_engine, "N8N_RUNNERS_STDLIB_ALLOW": "os"}
    )
    assert allowed.returncode == 0, allowed.stdout
    assert json.loads(allowed.stdout)["result"] == 0


def schema_workers() -> list[int]:
    """Process ids of the broker's schema workers run from this checkout."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if (
            b"runner.broker_server.schema_worker" in cmdline
            and str(PROJECT_ROOT).encode() in cmdline
        ):
            found.append(int(entry.name))
    return found


def test_up_serves_tasks_over_http_and_leaves_nothing(
    on_engine: dict[str, str], backend: str, docker_client: docker.DockerClient
) -> None:
    runner_id = f"pytest-up-{backend}"
    up = UpProcess({**on_engine, "SANDBOX_RUNNER_ID": runner_id, "SANDBOX_POOL_SIZE": "1"})
    try:
        with httpx.Client(base_url=up.url, timeout=90) as http:
            ok = http.post(
                "/v1/tasks",
                params={"wait": 60},
                json={"code": "return [{'json': {'n': len(_items)}}]", "items": [{"a": 1}]},
            ).json()
            failed = http.post(
                "/v1/tasks", params={"wait": 60}, json={"code": "raise KeyError('k')"}
            ).json()
            # More values than the broker checks inline: its schema workers do.
            schema = {"items": {"type": "integer"}}
            checked = http.post(
                "/v1/tasks",
                params={"wait": 60},
                json={"code": "return list(range(1500))", "outputSchema": schema},
            ).json()
            workers = schema_workers()
    finally:
        exit_code = up.stop()
    assert ok["result"] == [{"json": {"n": 1}}], ok
    assert ok["audit"]["isolation"]["backend"] == backend
    assert failed["error"]["code"] == "user_error", failed
    assert checked["status"] == "success", checked
    assert workers, "the result was checked in a schema worker"
    assert exit_code == 0, up.output
    assert schema_workers() == []  # stopped with the broker
    # Its warm pool and every task's container went with it, on either engine.
    assert remains(docker_client, labels={LABEL_OWNER: runner_id}) == []


@pytest.mark.parametrize(
    ("args", "env", "stdin", "needle"),
    [
        pytest.param(["exec", "/nonexistent.py"], {}, None, "cannot read", id="missing-file"),
        pytest.param(
            ["exec", "-", "--items", "{not json"], {}, "return 1", "not a JSON", id="bad-items"
        ),
        pytest.param(
            ["exec", "-", "--items", "[1]"], {}, "return 1", "not an object", id="item-not-object"
        ),
        pytest.param(
            ["exec", "-", "--mode", "sideways"], {}, "return 1", "sideways", id="bad-mode"
        ),
        pytest.param(
            ["exec", "-"],
            {"N8N_RUNNERS_STDLIB_ALLOW": "*,os"},
            "return 1",
            "must be used alone",
            id="bad-allowlist",
        ),
        pytest.param(
            ["exec", "-"],
            {"SANDBOX_MEMORY_MB": "lots"},
            "return 1",
            "invalid configuration: SANDBOX_MEMORY_MB: Input should be a valid integer",
            id="bad-number",
        ),
        pytest.param(
            ["exec", "-"],
            {"DOCKER_HOST": "unix:///nonexistent.sock"},
            "return 1",
            "Cannot reach the Docker daemon",
            id="no-daemon",
        ),
    ],
)
def test_usage_configuration_and_infrastructure_errors_exit_2_without_traceback(
    args: list[str], env: dict[str, str], stdin: str | None, needle: str
) -> None:
    done = sandbox_runner(*args, stdin=stdin, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_version_and_help() -> None:
    assert sandbox_runner("--version").stdout.startswith("sandbox-runner, version ")
    help_text = sandbox_runner("exec", "--help").stdout
    for option in ("--items", "--mode", "--continue-on-fail", "--timeout"):
        assert option in help_text
