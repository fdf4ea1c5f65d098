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
- both examples in docs/testing.md run as is (a user's pytest file each).

Ryuk cannot be pulled here: TESTCONTAINERS_RYUK_DISABLED=true, and the containers
clean up after themselves (checked).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import docker
import httpx
import pytest
from helpers import runner_free_env, sample, until

from runner.policy import load_bundle
from runner.sandbox.labels import LABEL_OWNER
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
