"""The runner image, end to end, started with testcontainers (``runner.testing``).

- the image builds from this checkout (cached by input hash), runs as a non-root
  user, finds its policy bundle as an installed wheel, and its health check works;
- a runner container, wired to an embedded broker in this test process, runs tasks
  in task containers (siblings on the host's daemon), and its ``/metrics`` and the
  broker's count exactly what ran;
- a ``SandboxContainer`` (``sandbox-runner up``, broker and runner in one container)
  runs a task end to end, counts it in one scrape of both sides' metrics, takes a
  second runner container, and leaves nothing behind;
- ``run_task`` on an ``EmbeddedBrokerContainer`` with no runner fails within 10 s
  saying so (not after its 120 s timeout), and leaves no task queued;
- ``up`` in the image keeps its tasks in the SQLite store in ``/var/lib/sandbox-broker``:
  with a volume there, a finished task's result outlives a restart of the container
  and its replacement by a new one; on a read-only root with no volume it refuses to
  start, in one line naming the setting (no traceback);
- both examples in docs/testing.md run as is (a user's pytest file each);
- started with the flags docs/operations.md gives for the OCI backend, the runner
  image runs ``exec`` and ``up`` with task containers made by runc inside it (the
  audit record says so) and leaves nothing behind (no task container, bundle,
  runtime state or cgroup); the same flags without ``SANDBOX_BACKEND=oci`` keep the
  image's engine, Docker; the default runner container's audit records say Docker.

Ryuk cannot be pulled here: TESTCONTAINERS_RYUK_DISABLED=true, and the containers
clean up after themselves (checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import docker
import httpx
import pytest
from helpers import remains, runner_free_env, sample, until

from runner.policy import load_bundle
from runner.sandbox.labels import LABEL_OWNER
from runner.sandbox.oci import cgroups
from runner.settings import PROJECT_ROOT

from .harness import AUTH_TOKEN, broker_settings

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.core.network import Network

from runner.testing import (
    LABEL_TESTING,
    LABEL_TESTING_RUNNER,
    EmbeddedBrokerContainer,
    SandboxContainer,
    SandboxRunnerContainer,
    SandboxServiceError,
    runner_image,
    session_labels,
)

API_KEY = "runner-image-test-key"
BROKER_STORE = "/var/lib/sandbox-broker/broker-tasks.sqlite3"  # the image's
DOCS = PROJECT_ROOT / "docs" / "testing.md"
# The examples of docs/testing.md, by the marker before each, and how many tests each has.
EXAMPLES = {
    "sandbox-container": (
        "<!-- example: SandboxContainer, executed by tests/integration/test_runner_image.py -->",
        3,
    ),
    "broker-and-runner": (
        "<!-- example: the pair, executed by tests/integration/test_runner_image.py -->",
        3,
    ),
}


@pytest.fixture(scope="module")
def image(docker_client: docker.DockerClient, task_image: str) -> str:
    started = time.monotonic()
    tag = runner_image(docker_client)
    print(f"runner image {tag} ready in {time.monotonic() - started:.1f}s")

    # A second look is a cache hit: the tag is a hash of the inputs, nothing is built.
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the runner image was rebuilt although nothing changed")

    with mock.patch("runner.runner_image.docker_build", no_build):
        assert runner_image(docker_client) == tag
    return tag


def test_the_runner_image_is_non_root_and_finds_its_policy_bundle(
    docker_client: docker.DockerClient, image: str
) -> None:
    config = docker_client.images.get(image).attrs["Config"]
    assert config["User"] == "10002:10002"
    assert config["Healthcheck"]["Test"] == ["CMD", "sandbox-runner", "healthcheck"]
    assert config["Entrypoint"] == ["tini", "--", "sandbox-runner"]
    assert config["Cmd"] == ["serve"]
    # Docker makes its task containers unless the operator opts in (docs/operations.md).
    assert "SANDBOX_BACKEND=docker" in config["Env"]
    assert "SANDBOX_STATE_DIR=/var/lib/sandbox-runner-oci" in config["Env"]
    # The broker's task store: the runner user's own directory, apart from the state
    # directory (root's, for the OCI backend).
    assert f"SANDBOX_BROKER_STORE=sqlite:///{BROKER_STORE}" in config["Env"]
    listing = docker_client.containers.run(
        image,
        ["-c", "stat -c '%u %a' /var/lib/sandbox-broker"],
        entrypoint="sh",
        network_mode="none",
        remove=True,
    )
    assert listing.decode().split() == ["10002", "700"]
    lint = json.loads(
        docker_client.containers.run(
            image, ["policy", "lint", "--json"], network_mode="none", remove=True
        )
    )
    assert lint["ok"] is True
    # The bundle inside is exactly this checkout's (same sha256 as every audit record),
    # found by the installed wheel where the image put it.
    assert lint["sha256"] == load_bundle(PROJECT_ROOT / "policies").sha256
    assert lint["bundle"] == "/opt/sandbox-runner/share/sandbox-runner/policies"


@pytest.fixture
def network() -> Iterator[Network]:
    with Network(docker_network_kw={"labels": session_labels()}) as net:
        yield net


async def test_runner_container_runs_tasks_for_the_embedded_broker_and_counts_them(
    image: str, network: Network, docker_client: docker.DockerClient
) -> None:
    from runner.broker_server.server import running_broker

    # The broker runs in this process, listening on the network's gateway: the runner
    # container reaches the host there (the default bridge is not used at all).
    gateway = network._unwrap_network.attrs["IPAM"]["Config"][0]["Gateway"]
    settings = broker_settings(broker_host=gateway, api_keys=f"{API_KEY}=default")
    async with running_broker(settings, auth_token=AUTH_TOKEN) as running:
        runner = SandboxRunnerContainer(
            image=image,
            broker_uri=running.url,
            auth_token=AUTH_TOKEN,
            api_url=running.url,
            api_key=API_KEY,
            network=network,
            env={
                "SANDBOX_POOL_SIZE": "1",
                "N8N_RUNNERS_MAX_CONCURRENCY": "2",
                "SANDBOX_LOG_FORMAT": "json",
            },
        )
        started = time.monotonic()
        await asyncio.to_thread(runner.start)  # blocking waits; the broker needs the loop
        try:
            print(f"runner container ready in {time.monotonic() - started:.1f}s")
            assert len(running.broker.runner_ids()) == 1
            documents = await _run_tasks(running.url)
            ok, per_item, failing, rejected = documents
            assert ok["status"] == "success", ok
            assert ok["result"] == [{"json": {"sum": 6}}]
            assert ok["prints"] == [["'in a container'"]]
            assert per_item["result"] == [
                {"json": {"double": 2}, "pairedItem": {"item": 0}},
                {"json": {"double": 4}, "pairedItem": {"item": 1}},
            ]
            assert failing["error"]["code"] == "user_error"
            assert rejected["error"]["code"] == "security_violation"
            assert rejected["audit"]["containerId"] is None
            # Ran in task containers: hardened siblings on the host's daemon, not in the
            # runner container, never with the socket; all of them gone afterwards.
            audit = ok["audit"]
            assert audit["containerId"]
            assert audit["image"].startswith("sandbox-runner-task:")
            assert audit["isolation"]["mounts"] == "tmpfs /tmp only"
            # The image's engine, as it is started by default (non-root, the socket).
            assert audit["isolation"]["backend"] == "docker"
            assert audit["runnerId"] == runner.runner_id
            assert {d["audit"]["details"]["containerStart"] for d in documents[:3]} <= {
                "warm",
                "cold",
            }

            runner_metrics = await asyncio.to_thread(runner.metrics)
            async with httpx.AsyncClient() as client:
                broker_metrics = (
                    await client.get(
                        f"{running.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
                    )
                ).text
            _check_runner_metrics(runner_metrics, documents)
            _check_broker_metrics(broker_metrics)
            _check_json_logs(runner.logs(), documents)
            # The task containers it makes (a running task, and its warm slot) get
            # neither the Docker socket nor a way to the API, judged by the daemon.
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                slow = await http.post(
                    "/v1/tasks",
                    json={"code": "import time\ntime.sleep(3)\nreturn 1"},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
                assert slow.status_code == 202, slow.text
                siblings = await until(
                    lambda: docker_client.api.containers(
                        filters={"label": f"{LABEL_OWNER}={runner.runner_id}"}
                    ),
                    30,
                    "a task container of the runner container",
                )
                for sibling in siblings:
                    attrs = docker_client.api.inspect_container(sibling["Id"])
                    mounts = json.dumps(attrs["Mounts"]) + json.dumps(attrs["HostConfig"]["Binds"])
                    assert "docker.sock" not in mounts, mounts
                    env = attrs["Config"]["Env"] or []
                    assert not [e for e in env if e.startswith("DOCKER_")], env
                done = await http.get(
                    f"/v1/tasks/{slow.json()['taskId']}?wait=30",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
                assert done.json()["result"] == 1

            # The image's own health check command answers inside the container.
            code, output = runner.get_wrapped_container().exec_run(
                ["sandbox-runner", "healthcheck"]
            )
            assert code == 0, output
        finally:
            await asyncio.to_thread(runner.stop)
    leftovers = docker_client.api.containers(
        all=True, filters={"label": f"{LABEL_OWNER}={runner.runner_id}"}
    )
    assert leftovers == []
    assert not docker_client.api.containers(all=True, filters={"id": runner.get_container_id()})


async def _run_tasks(url: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = [
        {
            "code": "print('in a container')\nreturn [{'json': {'sum': sum(i['json']['n'] "
            "for i in _items)}}]",
            "items": [{"n": 1}, {"n": 2}, {"n": 3}],
        },
        {
            "code": "return {'double': _item['json']['n'] * 2}",
            "items": [{"n": 1}, {"n": 2}],
            "mode": "per_item",
        },
        {"code": "raise ValueError('no luck')"},
        {"code": "import os\nreturn [{'json': {'x': os.getcwd()}}]"},
    ]
    documents = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=90
    ) as client:
        for body in tasks:  # one after the other: exact, predictable counts
            response = await client.post("/v1/tasks", params={"wait": 60}, json=body)
            assert response.status_code == 200, response.text
            documents.append(response.json())
    return documents


def _check_runner_metrics(text: str, documents: list[dict[str, Any]]) -> None:
    assert sample(text, "sandbox_runner_tasks_total", outcome="success", error_code="") == 2
    assert (
        sample(text, "sandbox_runner_tasks_total", outcome="user_error", error_code="user_error")
        == 1
    )
    assert (
        sample(
            text,
            "sandbox_runner_tasks_total",
            outcome="security_violation",
            error_code="security_violation",
        )
        == 1
    )
    # Three tasks reached a container (the analyzer stopped the fourth before one).
    starts = {
        kind: sample(text, "sandbox_runner_container_start_seconds_count", start=kind) or 0
        for kind in ("warm", "cold")
    }
    assert sum(starts.values()) == 3
    kinds = [d["audit"]["details"]["containerStart"] for d in documents[:3]]
    assert starts == {"warm": kinds.count("warm"), "cold": kinds.count("cold")}
    assert sample(text, "sandbox_runner_task_run_seconds_count") == 3
    assert sample(text, "sandbox_runner_task_duration_seconds_count") == 4
    assert sample(text, "sandbox_runner_queue_wait_seconds_count") == 4
    assert sample(text, "sandbox_runner_task_run_seconds_bucket", le="+Inf") == 3
    run_sum = sample(text, "sandbox_runner_task_run_seconds_sum")
    expected = sum(d["audit"]["durationsMs"]["run"] for d in documents[:3]) / 1000
    assert run_sum == pytest.approx(expected, abs=0.01)
    assert sample(text, "sandbox_runner_running_tasks") == 0
    policy = load_bundle(PROJECT_ROOT / "policies").sha256
    info = [line for line in text.splitlines() if line.startswith("sandbox_runner_policy_info{")]
    assert len(info) == 1
    assert f'policy_sha256="{policy}"' in info[0]
    assert documents[0]["audit"]["policySha256"] == policy


def _check_json_logs(logs: str, documents: list[dict[str, Any]]) -> None:
    """SANDBOX_LOG_FORMAT=json: every line is an object; one audit record per task."""
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines
    assert all(line.startswith("{") for line in logs.splitlines() if line.strip()), logs
    audits = [line for line in lines if line["logger"] == "runner.audit"]
    assert [a["taskId"] for a in audits] == [d["audit"]["taskId"] for d in documents]
    assert audits[0]["event"] == "task_completed"
    completed = [line for line in lines if str(line.get("message", "")).startswith("Completed")]
    assert {line["taskId"] for line in completed} == {a["taskId"] for a in audits}


def _check_broker_metrics(text: str) -> None:
    assert sample(text, "sandbox_broker_tasks_submitted_total") == 4
    assert sample(text, "sandbox_broker_tasks_total", status="success", error_code="") == 2
    assert sample(text, "sandbox_broker_tasks_total", status="error", error_code="user_error") == 1
    assert (
        sample(text, "sandbox_broker_tasks_total", status="error", error_code="security_violation")
        == 1
    )
    assert sample(text, "sandbox_broker_queue_wait_seconds_count") == 4
    assert sample(text, "sandbox_broker_task_duration_seconds_count") == 4
    assert sample(text, "sandbox_broker_runners") == 1
    assert sample(text, "sandbox_broker_queued_tasks") == 0
    assert sample(text, "sandbox_broker_running_tasks") == 0
    assert (sample(text, "sandbox_broker_offers_total") or 0) >= 4


def docs_example(marker: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    _, found, rest = text.partition(marker)
    assert found, f"{DOCS} lost its example marker {marker}"
    match = re.search(r"```python\n(.*?)```", rest, re.S)
    assert match, "no python block after the marker"
    return match.group(1)


@pytest.mark.parametrize("example_name", EXAMPLES)
def test_the_examples_in_docs_testing_md_run_as_is(
    image: str, tmp_path: Path, docker_client: docker.DockerClient, example_name: str
) -> None:
    marker, tests = EXAMPLES[example_name]
    example = tmp_path / "test_user_example.py"
    example.write_text(docs_example(marker), encoding="utf-8")
    env = runner_free_env()
    env.update({"TESTCONTAINERS_RYUK_DISABLED": "true", "SANDBOX_RUNNER_IMAGE": image})
    before = {c["Id"] for c in docker_client.api.containers(all=True)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Exactly the example's tests ran and passed: none skipped, none deselected.
    assert re.search(rf"^{tests} passed in ", result.stdout, re.MULTILINE), result.stdout
    assert "skipped" not in result.stdout, result.stdout
    # It cleaned up after itself: no container of ours that was not there before.
    after = docker_client.api.containers(all=True, filters={"label": f"{LABEL_TESTING}=true"})
    assert [c["Id"] for c in after if c["Id"] not in before] == []


def _ours(client: docker.DockerClient) -> set[str]:
    """Ids of the containers runner.testing made (every one carries its label)."""
    return {
        c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL_TESTING}=true"})
    }


def test_sandbox_container_runs_a_task_in_one_container_and_leaves_nothing(
    image: str, docker_client: docker.DockerClient
) -> None:
    before = _ours(docker_client)
    sandbox = SandboxContainer(image=image, env={"SANDBOX_POOL_SIZE": "1"})
    started = time.monotonic()
    with sandbox:
        print(f"SandboxContainer ready in {time.monotonic() - started:.1f}s")
        container_id = sandbox.get_container_id()
        assert sandbox.network is not None
        network_id = sandbox.network.id
        # One container: `up`, hardened like the others, owning its task containers.
        attrs = docker_client.api.inspect_container(container_id)
        assert attrs["Config"]["Cmd"] == ["up", "--host", "0.0.0.0", "--port", "5679"]
        assert attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert attrs["HostConfig"]["SecurityOpt"] == ["no-new-privileges:true"]
        assert attrs["Config"]["Labels"][LABEL_TESTING_RUNNER] == sandbox.runner_id
        # Its broker's task store: the image's default place, on a tmpfs of its own.
        tmpfs = attrs["HostConfig"]["Tmpfs"]
        assert tmpfs["/var/lib/sandbox-broker"] == "uid=10002,gid=10002,mode=0700"
        assert f"task store: {BROKER_STORE} (queued tasks" in sandbox.logs()
        assert _ours(docker_client) - before == {container_id}
        assert len(sandbox.runners()) == 1  # its own runner, connected when ready

        document = sandbox.run_task(
            "print('in a container')\n"
            "return [{'json': {'sum': sum(i['json']['n'] for i in _items)}}]",
            items=[{"n": 1}, {"n": 2}],
        )
        assert document["status"] == "success", document
        assert document["result"] == [{"json": {"sum": 3}}]
        assert document["prints"] == [["'in a container'"]]
        assert document["audit"]["containerId"]
        assert document["audit"]["runnerId"] == sandbox.runner_id

        # One scrape, both sides: the broker's counts and its runner's.
        metrics = sandbox.metrics()
        assert sample(metrics, "sandbox_broker_tasks_total", status="success", error_code="") == 1
        assert sample(metrics, "sandbox_runner_tasks_total", outcome="success", error_code="") == 1
        assert sample(metrics, "sandbox_broker_runners") == 1
        assert sample(metrics, "sandbox_broker_queued_tasks") == 0

        # It is a broker too: a runner container joins it on its network.
        with SandboxRunnerContainer(sandbox, image=image, env={"SANDBOX_POOL_SIZE": "0"}) as extra:
            assert len(sandbox.runners()) == 2
    # Nothing left: not the service containers, not a task or pool container of their
    # runners, not the network.
    assert not docker_client.api.containers(all=True, filters={"id": container_id})
    for runner_id in (sandbox.runner_id, extra.runner_id):
        owned = docker_client.api.containers(
            all=True, filters={"label": f"{LABEL_OWNER}={runner_id}"}
        )
        assert owned == []
    assert _ours(docker_client) - before == set()
    assert docker_client.networks.list(ids=[network_id]) == []


def test_run_task_with_no_runner_fails_within_seconds_saying_so(image: str) -> None:
    with EmbeddedBrokerContainer(image=image) as broker:
        auth = {"Authorization": f"Bearer {broker.api_key}"}
        with httpx.Client(base_url=broker.url, headers=auth, timeout=30) as api:
            # The HTTP API says why a task waits.
            queued = api.post("/v1/tasks", json={"code": "return 1"})
            assert queued.status_code == 202, queued.text
            state = api.get(f"/v1/tasks/{queued.json()['taskId']}")
            assert state.status_code == 202
            assert state.json()["waitReason"]["code"] == "no_runner"
            assert state.json()["waitReason"]["message"].startswith(
                "No runner is connected to this broker. Start one with `sandbox-runner serve`"
            )
            assert api.delete(f"/v1/tasks/{queued.json()['taskId']}").status_code == 200

            # What a new user wrote, with the default 120 s timeout.
            started = time.monotonic()
            with pytest.raises(SandboxServiceError) as raised:
                broker.run_task("return [{'x': 1}]")
            elapsed_s = time.monotonic() - started
            print(f"run_task with no runner failed after {elapsed_s:.1f}s")
            assert elapsed_s < 10  # the requirement: within a few seconds, not 120 s
            message = str(raised.value)
            assert message.startswith(f"No runner is connected to this broker ({broker.url})")
            assert "SandboxRunnerContainer(broker)" in message
            assert "SandboxContainer()" in message
            assert "N8N_RUNNERS_TASK_BROKER_URI" in message

            # Nothing was left queued: the task was cancelled before the error.
            tasks = api.get("/v1/tasks").json()["tasks"]
            assert [t["status"] for t in tasks] == ["error", "error"]
            for task in tasks:
                document = api.get(f"/v1/tasks/{task['taskId']}").json()
                assert document["error"]["code"] == "cancelled"


# -- the broker's task store in the runner image -------------------------------------------


def _up_container(
    docker_client: docker.DockerClient, image: str, runner_id: str, *flags: str
) -> Any:
    """`up` in the runner image on the Docker engine (no warm pool), detached."""
    socket = "/var/run/docker.sock"
    argv = [
        "docker",
        "run",
        "-d",
        *_labels_flags(),
        "-e",
        f"SANDBOX_RUNNER_ID={runner_id}",
        "-e",
        f"SANDBOX_API_KEYS={API_KEY}=default",
        "-e",
        "SANDBOX_POOL_SIZE=0",
        "-v",
        f"{socket}:{socket}",
        "--group-add",
        str(os.stat(socket).st_gid),
        "-p",
        "127.0.0.1::5679",
        *flags,
        image,
        "up",
        "--host",
        "0.0.0.0",
        "--port",
        "5679",
    ]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    return docker_client.containers.get(started.stdout.strip())


@contextlib.contextmanager
def _api(container: Any) -> Iterator[httpx.Client]:
    """The container's API, once its broker answers and its runner is connected."""
    container.reload()
    port = container.attrs["NetworkSettings"]["Ports"]["5679/tcp"][0]["HostPort"]
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=90,
    ) as api:
        _wait_for(lambda: _answers(api), 120, "the broker in the runner container", container)
        _wait_for(
            lambda: bool(api.get("/v1/health").json()["runners"]), 120, "its runner", container
        )
        yield api


def test_up_in_the_runner_image_keeps_a_finished_result_on_its_volume(
    image: str, docker_client: docker.DockerClient
) -> None:
    """The image's default store, on a volume: a result survives `docker restart`
    and a new container on the same volume (the store, not the container's layer)."""
    runner_id = f"store-image-{uuid.uuid4().hex[:10]}"
    volume = docker_client.volumes.create(labels=session_labels())
    containers: list[Any] = []
    try:
        containers.append(
            _up_container(
                docker_client, image, runner_id, "-v", f"{volume.name}:/var/lib/sandbox-broker"
            )
        )
        first = containers[-1]
        with _api(first) as api:
            submitted = api.post(
                "/v1/tasks", json={"code": SUM_TASK, "items": [{"n": 1}, {"n": 2}]}
            )
            assert submitted.status_code == 202, submitted.text
            task = f"/v1/tasks/{submitted.json()['taskId']}"
            done = api.get(task, params={"wait": 60})
        assert done.status_code == 200, done.text
        document = done.json()
        assert document["result"] == [{"json": {"sum": 3}}], document
        logs = first.logs().decode(errors="replace")
        assert f"task store: {BROKER_STORE} (queued tasks and results survive a restart)" in logs

        first.restart(timeout=30)
        with _api(first) as api:
            again = api.get(task)
        assert again.status_code == 200, again.text
        assert again.json() == document

        first.stop(timeout=30)
        assert first.wait(timeout=30)["StatusCode"] == 0, first.logs()[-3000:]
        first.remove()
        containers.remove(first)
        containers.append(
            _up_container(
                docker_client, image, runner_id, "-v", f"{volume.name}:/var/lib/sandbox-broker"
            )
        )
        with _api(containers[-1]) as api:
            replaced = api.get(task)
        assert replaced.status_code == 200, replaced.text
        assert replaced.json() == document
    finally:
        for container in containers:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        volume.remove(force=True)
    assert remains(docker_client, labels={LABEL_OWNER: runner_id}) == []


def test_up_on_a_read_only_root_without_a_volume_says_which_setting_to_change(
    image: str,
) -> None:
    """No place for the store: one line naming it and the setting, exit 2, at once
    (before the runner's self-check: no Docker API is given here)."""
    argv = ["docker", "run", "--rm", "--read-only", *_labels_flags(), image, "up"]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.strip().splitlines() == [
        "sandbox-runner: error: Cannot create the broker's task store in "
        "/var/lib/sandbox-broker (Read-only file system; give the broker a file in a "
        "directory uid 10002 can write: "
        "SANDBOX_BROKER_STORE=sqlite:////that/dir/broker-tasks.sqlite3 (or "
        "SANDBOX_STATE_DIR for the default file there; in a container, mount a volume "
        "there), or SANDBOX_BROKER_STORE=memory to keep nothing across a restart)"
    ]
    assert "Traceback" not in ran.stdout + ran.stderr


# -- the OCI backend in the runner container ---------------------------------------------
#
# Started with the flags docs/operations.md gives (read from it: the docs are what is
# run), the operator's own parts (name, restart policy, broker address and token) left
# out. What the runner container left behind is read on the host: Docker's containers
# by owner label, the state volume's files, the host's cgroup hierarchy.

OPERATIONS = PROJECT_ROOT / "docs" / "operations.md"
OCI_MARKER = (
    "<!-- the OCI backend in a container: run by tests/integration/test_runner_image.py -->"
)
RUNNER_SECCOMP = PROJECT_ROOT / "examples" / "oci-backend" / "runner-seccomp.json"
OCI_OPT_IN = ("-e", "SANDBOX_BACKEND=oci")
# The documented command's parts that are the operator's, not the OCI backend's.
OPERATORS_OWN = {"--name", "--restart", "--stop-timeout"}
SUM_TASK = (
    "print('in a container')\nreturn [{'json': {'sum': sum(i['json']['n'] for i in _items)}}]"
)


def documented_oci_flags(state_volume: str) -> list[str]:
    """The `docker run` flags of docs/operations.md's OCI example, with this test's
    state volume and the checkout's seccomp profile in place of the operator's copy."""
    text = OPERATIONS.read_text(encoding="utf-8")
    _, found, rest = text.partition(OCI_MARKER)
    assert found, f"{OPERATIONS} lost its marker {OCI_MARKER}"
    block = re.search(r"```sh\n(.*?)```", rest, re.S)
    assert block, "no sh block after the marker"
    tokens = shlex.split(block.group(1).replace("\\\n", " "))
    assert tokens[:2] == ["docker", "run"]
    end = tokens.index("sandbox-runner:latest")
    assert tokens[end + 1 :] == ["serve"]
    flags, kept = tokens[2:end], []
    while flags:
        flag = flags.pop(0)
        if flag == "-d":
            continue
        value = flags.pop(0)
        if (
            flag in OPERATORS_OWN
            or (flag == "-e" and value.startswith("N8N_RUNNERS_"))
            or (flag == "-v" and value.startswith("/etc/sandbox-runner/token:"))
        ):
            continue
        if flag == "-v" and value.startswith("sandbox-runner-oci:"):
            value = value.replace("sandbox-runner-oci", state_volume, 1)
        if flag == "--security-opt" and value.startswith("seccomp=/etc/sandbox-runner/"):
            value = f"seccomp={RUNNER_SECCOMP}"
        kept += [flag, value]
    return kept


@pytest.fixture
def oci_state(docker_client: docker.DockerClient) -> Iterator[tuple[str, Path]]:
    """A fresh state volume: its name, and where its files are on this host."""
    volume = docker_client.volumes.create(labels=session_labels())
    try:
        yield volume.name, Path(volume.attrs["Mountpoint"])
    finally:
        volume.remove(force=True)


@pytest.fixture
def oci_runner_id() -> Iterator[str]:
    """A runner id of its own. Afterwards its cgroups are removed from the host: the
    parents it leaves (empty), and what a failed test left (a passing one asserts
    there is nothing)."""
    runner_id = f"oci-image-{uuid.uuid4().hex[:10]}"
    yield runner_id
    for container_id in cgroups.leftover_containers(runner_id):
        cgroups.remove(runner_id, container_id)
    for parent in _cgroup_parents(runner_id):
        with contextlib.suppress(OSError):
            parent.rmdir()


def _cgroup_parents(runner_id: str) -> list[Path]:
    root, parent = cgroups.ROOT, cgroups.PARENT
    return sorted({*root.glob(f"{parent}/{runner_id}"), *root.glob(f"*/{parent}/{runner_id}")})


def _labels_flags() -> list[str]:
    return [
        arg for name, value in session_labels().items() for arg in ("--label", f"{name}={value}")
    ]


def _state_files(mountpoint: Path) -> dict[str, list[str]]:
    """What the runner keeps per container in its state directory (none when idle)."""
    return {
        name: sorted(p.name for p in (mountpoint / name).iterdir())
        for name in ("bundles", "runtime-runc")
        if (mountpoint / name).is_dir()
    }


def _exec_in_runner_container(image: str, flags: list[str], runner_id: str) -> dict[str, Any]:
    argv = [
        "docker",
        "run",
        "--rm",
        "-i",
        *_labels_flags(),
        "-e",
        f"SANDBOX_RUNNER_ID={runner_id}",
        *flags,
        image,
        "exec",
        "--items",
        json.dumps([{"n": 1}, {"n": 2}]),
        "-",
    ]
    started = time.monotonic()
    done = subprocess.run(
        argv, input=SUM_TASK, capture_output=True, text=True, timeout=240, check=False
    )
    print(f"exec in the runner container: {time.monotonic() - started:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, Any] = json.loads(done.stdout)
    assert document["status"] == "success", document
    assert document["result"] == [{"json": {"sum": 3}}]
    assert document["prints"] == [["'in a container'"]]
    return document


@pytest.mark.parametrize("opt_in", [True, False], ids=["oci-opted-in", "no-opt-in"])
def test_exec_in_the_runner_image_uses_the_engine_the_operator_chose_and_leaves_nothing(
    image: str,
    docker_client: docker.DockerClient,
    oci_state: tuple[str, Path],
    oci_runner_id: str,
    opt_in: bool,
) -> None:
    """With the documented flags, `exec` runs a task end to end on the OCI backend
    (runc in the runner container, the task image unpacked into the state volume);
    the same flags without the opt-in keep the image's engine, Docker, although the
    OCI backend could run there."""
    volume, mountpoint = oci_state
    flags = documented_oci_flags(volume)
    assert flags[:2] == list(OCI_OPT_IN)
    if not opt_in:
        flags = flags[2:]
    document = _exec_in_runner_container(image, flags, oci_runner_id)
    isolation = document["audit"]["isolation"]
    in_force = isolation["guarantees"]["inForce"]
    assert {name: v for name, v in in_force.items() if v not in ("pass", "not-available")} == {}
    assert in_force["capabilities-dropped"] == "pass"
    assert in_force["seccomp-filter"] == "pass"
    assert document["audit"]["runnerId"] == oci_runner_id
    if opt_in:
        assert isolation["backend"] == "oci"
        assert isolation["runtime"].startswith("runc version ")
        # The state volume is root's alone (it starts with the image's directory).
        info = mountpoint.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)
        assert [p.name for p in (mountpoint / "rootfs").iterdir()]  # the unpacked image
    else:
        assert isolation["backend"] == "docker"
        assert "(Docker " in isolation["runtime"]
        assert not (mountpoint / "rootfs").exists()  # the OCI backend never started
    # Nothing left: no task container on the daemon, no bundle, runtime state or cgroup.
    assert remains(docker_client, labels={LABEL_OWNER: oci_runner_id}, state_dir=mountpoint) == []
    assert all(not files for files in _state_files(mountpoint).values()), _state_files(mountpoint)
    assert cgroups.leftover_containers(oci_runner_id) == []


def test_up_in_the_runner_image_on_the_oci_backend_serves_tasks_and_leaves_nothing(
    image: str,
    docker_client: docker.DockerClient,
    oci_state: tuple[str, Path],
    oci_runner_id: str,
) -> None:
    """`up` (broker and runner, with its warm pool) in a runner container started with
    the documented flags: a task over the HTTP API runs in a pool slot made by runc,
    whose cgroups are in the host's hierarchy; a `docker stop` drains it and leaves
    nothing behind."""
    volume, mountpoint = oci_state
    argv = [
        "docker",
        "run",
        "-d",
        *_labels_flags(),
        "-e",
        f"SANDBOX_RUNNER_ID={oci_runner_id}",
        "-e",
        f"SANDBOX_API_KEYS={API_KEY}=default",
        "-e",
        "SANDBOX_POOL_SIZE=2",
        "-e",
        "N8N_RUNNERS_TASK_TIMEOUT=300",  # a task may ask for 300 s (the cancel below)
        "-p",
        "127.0.0.1::5679",
        *documented_oci_flags(volume),
        image,
        "up",
        "--host",
        "0.0.0.0",
        "--port",
        "5679",
    ]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    container = docker_client.containers.get(started.stdout.strip())
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["5679/tcp"][0]["HostPort"]
        auth = {"Authorization": f"Bearer {API_KEY}"}
        api_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=api_url, headers=auth, timeout=90) as api:
            _wait_for(
                lambda: _answers(api),
                120,
                "the broker in the runner container to answer",
                container,
            )
            # The pool's slots: runc containers with cgroups in the host's hierarchy.
            _wait_for(
                lambda: len(cgroups.leftover_containers(oci_runner_id)) >= 2,
                60,
                "the warm pool's two slots",
                container,
            )
            response = api.post(
                "/v1/tasks",
                params={"wait": 60},
                json={"code": SUM_TASK, "items": [{"n": 1}, {"n": 2}]},
            )
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["status"] == "success", document
        assert document["result"] == [{"json": {"sum": 3}}]
        audit = document["audit"]
        assert audit["isolation"]["backend"] == "oci"
        assert audit["isolation"]["runtime"].startswith("runc version ")
        assert audit["details"]["containerStart"] == "warm"
        assert audit["runnerId"] == oci_runner_id
        assert _cancelled_task_leaves_nothing(api_url, auth, mountpoint, container)
        # SIGTERM: it drains, closes its pool and exits 0.
        container.stop(timeout=30)
        assert container.wait(timeout=30)["StatusCode"] == 0, container.logs()[-3000:]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    assert remains(docker_client, labels={LABEL_OWNER: oci_runner_id}, state_dir=mountpoint) == []
    assert all(not files for files in _state_files(mountpoint).values()), _state_files(mountpoint)
    assert cgroups.leftover_containers(oci_runner_id) == []


def _cancelled_task_leaves_nothing(
    api_url: str, auth: dict[str, str], mountpoint: Path, container: Any
) -> bool:
    """A task cancelled while it sleeps: its container is killed and removed long
    before its own timeout. The runner kills it from inside the runner container, as
    root, while its PID 1 runs as the task user: the kernel wants CAP_KILL (without it
    the task ran on to its timeout, reported cancelled at once)."""
    with httpx.Client(base_url=api_url, headers=auth, timeout=90) as api:
        # Its own timeout (300 s, which the agent inside would enforce) far after the
        # bound below: only the runner's kill ends it in time.
        submitted = api.post(
            "/v1/tasks", json={"code": "import time\ntime.sleep(600)", "timeoutSeconds": 300}
        )
        assert submitted.status_code == 202, submitted.text
        task = f"/v1/tasks/{submitted.json()['taskId']}"
        _wait_for(
            lambda: api.get(task).json().get("status") == "running",
            60,
            "the task running",
            container,
        )
        assert api.delete(task).status_code == 200
        document = api.get(task, params={"wait": 60}).json()
    assert document["error"]["code"] == "cancelled", document
    # The broker's document has no audit record (the broker ended the task); the
    # runner's, in its log, names the task's container.
    task_id = submitted.json()["taskId"]
    _wait_for(lambda: _audit_record(container, task_id), 60, "the runner's audit record", container)
    record = _audit_record(container, task_id)
    assert record is not None
    assert record["outcome"] == "cancelled", record
    container_id = record["containerId"]
    assert container_id
    _wait_for(
        lambda: remains(None, container_id=container_id, state_dir=mountpoint) == [],
        60,
        f"the cancelled task's container {container_id} gone",
        container,
    )
    return True


def _audit_record(container: Any, task_id: str) -> dict[str, Any] | None:
    """The runner's audit record of ``task_id``, from the container's (text) log."""
    for line in container.logs().decode(errors="replace").splitlines():
        _, marker, record = line.partition(" runner.audit: ")
        if marker and f'"taskId": "{task_id}"' in record:
            found: dict[str, Any] = json.loads(record)
            return found
    return None


def _answers(api: httpx.Client) -> bool:
    try:
        return api.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, container: Any) -> None:
    """Until ``predicate`` holds (bounded, real time); the container's log if not."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        container.reload()
        if container.status != "running" or time.monotonic() > deadline:
            logs = container.logs().decode(errors="replace")[-3000:]
            raise AssertionError(f"waited in vain for {what} ({container.status}): {logs}")
        time.sleep(0.2)
