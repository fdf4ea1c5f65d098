"""A fake agent in a real task container: every way its result framing can be wrong,
and a hostile envelope the host must cap itself.

The image is the task image with another entrypoint: a script that reads the task
envelope like the agent, then writes what the task's ``code`` names instead of a
valid result frame. It runs under the full isolation through the real sandbox of
each engine: Docker's attach stream and its demultiplexing, or the OCI backend's
pipes; the early end on a complete frame, the exit code and the interpretation are
all the production ones.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import remains

from runner.cli.wiring import make_pipeline
from runner.pipeline import TaskPipeline
from runner.sandbox.base import Outcome, Stage
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.oci.sandbox import OciSandbox
from runner.settings import Settings

from .conftest import make_sandbox, request

FAKE_AGENT = r"""
import json, struct, sys, time
header = sys.stdin.buffer.read(4)
envelope = json.loads(sys.stdin.buffer.read(struct.unpack(">I", header)[0]))
good = json.dumps({"version": 2, "status": "success", "result": 1}).encode()
frame = struct.pack(">I", len(good)) + good
# A hostile envelope: 300,000 empty print entries after a valid one (about 1 MB).
flood = good + b"\n[]" * 300_000
outputs = {
    "print-flood": struct.pack(">I", len(flood)) + flood,
    "control": frame,
    "length-prefix-too-long": struct.pack(">I", len(good) + 10) + good,
    "length-prefix-4-gib": struct.pack(">I", 2**32 - 1) + good,
    "truncated": frame[:-5],
    "invalid-json": struct.pack(">I", 5) + b"{nope",
    "not-an-envelope": struct.pack(">I", 7) + b"[1,2,3]",
    "two-frames": frame + frame,
    "garbage": b"Traceback (most recent call last): not a frame at all\n",
    "garbage-then-frame": b"hello" + frame,
    "nothing": b"",
}
sys.stdout.buffer.write(outputs[envelope["code"]])  # one write: one read on the host
sys.stdout.flush()
"""

DOCKERFILE = """FROM {base}
COPY fake_agent.py /opt/fake_agent.py
ENTRYPOINT ["tini", "--", "python3", "-I", "-B", "/opt/fake_agent.py"]
"""

BROKEN = {
    "length-prefix-too-long": "truncated",
    "length-prefix-4-gib": "truncated",
    "truncated": "truncated",
    "invalid-json": "not valid UTF-8 JSON",
    "not-an-envelope": "wrong shape",
    "two-frames": "more than one result frame",
    "garbage": "length prefix says 1416782179 bytes",  # "Trac" read as a length
    "garbage-then-frame": "length prefix says 1751477356 bytes",  # "hell" read as a length
    "nothing": "no result",
}


@pytest.fixture(scope="module")
def fake_agent_image(docker_client: docker.DockerClient, task_image: str) -> Iterator[str]:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in (
            ("Dockerfile", DOCKERFILE.format(base=task_image)),
            ("fake_agent.py", FAKE_AGENT),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    tag = "sandbox-runner-fake-agent:pytest"
    docker_client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    try:
        yield tag
    finally:
        docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def unpacked_roots() -> Iterator[set[Path]]:
    """The OCI backend's unpacked roots of the fake image (one per image id, which no
    other test uses): removed with the image, or each run would leave one."""
    roots: set[Path] = set()
    yield roots
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fake_pipeline(
    base_settings: Settings, fake_agent_image: str, unpacked_roots: set[Path], backend: str
) -> Any:
    @asynccontextmanager
    async def factory() -> AsyncIterator[tuple[TaskPipeline, ContainerSandbox[Any]]]:
        """Cold containers (no pool) of the fake agent's image, under the full policy."""
        client = docker.from_env(timeout=60)
        sandbox = make_sandbox(backend, base_settings, client, fake_agent_image)
        pipeline = make_pipeline(
            base_settings,
            sandbox,
            image=fake_agent_image,
            image_id=None,
            isolation=sandbox.isolation.report(),
        )
        try:
            yield pipeline, sandbox
        finally:
            await sandbox.aclose()
            client.close()  # the OCI backend's is not its own to close
            if isinstance(sandbox, OciSandbox) and sandbox._rootfs is not None:
                unpacked_roots.add(sandbox._rootfs.path)

    return factory


async def test_the_fake_agents_valid_frame_is_a_success(fake_pipeline: Any) -> None:
    # The control: the image and the framing work, so the failures below are the frames'.
    async with fake_pipeline() as (pipeline, _):
        report = await pipeline.run(request("control"))
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.result == 1


@pytest.mark.parametrize(("case", "hint"), BROKEN.items(), ids=BROKEN.keys())
async def test_a_fake_agents_broken_framing_is_an_agent_protocol_error(
    fake_pipeline: Any, docker_client: docker.DockerClient, case: str, hint: str
) -> None:
    async with fake_pipeline() as (pipeline, sandbox):
        report = await pipeline.run(request(case))
        await sandbox.wait_removals()
    assert report.outcome is Outcome.AGENT_ERROR
    assert report.error is not None
    assert report.error.message == "Failed to read result from child process"
    assert report.error.stage is Stage.RESULT
    assert hint in report.error.description
    assert report.audit["details"]["exitCode"] == 0
    assert remains(docker_client, container_id=report.audit["containerId"]) == []


async def test_the_host_caps_a_hostile_envelopes_print_entries(fake_pipeline: Any) -> None:
    # Issue item 1, the runner's side: whatever the agent sends, the host keeps at
    # most max-print-calls entries (100 by default) and counts the rest.
    async with fake_pipeline() as (pipeline, _):
        report = await pipeline.run(request("print-flood"))
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.prints == [[]] * 100 + [["[Output truncated - 299900 more print statements]"]]
    assert report.audit["details"]["printsReceived"] == 300_000
    assert report.audit["details"]["printsDropped"] == 299_900
