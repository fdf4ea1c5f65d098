"""Runs the red-team catalog through the real pipeline, mode by mode, and records it.

One pipeline per mode serves every probe of that mode (a warm pool of two), so the
whole suite costs a few minutes on a 2-core machine. Around the probes the harness
also:

- keeps a *listener* task running in another container of the same isolation (it
  binds an abstract unix socket, leaves a file in its /tmp, tries SysV shared
  memory and a key in the uid's keyring), so the cross-task probes have a real
  peer to reach for. Its readiness is polled (``docker exec`` in its container
  until its set-up has finished), and the same exec is the positive control: from
  inside the listener's own container (its network namespace) a connect to the
  abstract socket succeeds, so a refusal from another container means isolation,
  not a missing listener;
- inspects every container of this runner id while tasks run (``Config.Env``,
  labels, command) for the runner's canary secret and the broker's tokens;
- runs one trivial task per pipeline after the batch (the runner keeps serving),
  and lists what containers of this runner id are left once the pipelines closed.

The observations go to a record (:func:`record`): by default an untracked file of
the test session; with ``REDTEAM_RECORD=1`` also the tracked ``last_run.json``,
which ``scripts/redteam_report.py`` turns into the tables of ``docs/security.md``.
Secrets are redacted before anything is written, so a leak shows up as
``<CANARY>`` rather than as the secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker

from runner.cli.wiring import load_isolation
from runner.pipeline import TaskPipeline, TaskReport, TaskRequest
from runner.policy import DOCKER_DEFAULT_PROFILE
from runner.sandbox.container import ContainerSandbox
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import LABEL_MANAGED, LABEL_OWNER, LABEL_TASK
from runner.sandbox.oci.runtime import OciRuntime
from runner.settings import Settings

from .catalog import MODES, Probe, last_run

PipelineFactory = Callable[..., AbstractAsyncContextManager[TaskPipeline]]

CANARY_NAME = "SANDBOX_REDTEAM_CANARY"
# The probes search for these prefixes followed by 32 hex digits: the random part
# never enters a task, so a match can only be a leak.
CANARY_PREFIX = "rtcanary-"
TOKEN_PREFIX = "rttoken-"

LISTENER_SETUP = r"""
import ctypes, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\0redteam-listener")
server.listen(8)
with open("/tmp/redteam-listener", "w") as handle:
    handle.write("left by another task")
shm = libc.shmget(0x52544D, 4096, 0o1666)
key = libc.syscall(248, b"user", b"redteam-listener", b"secret", 6, -4)
done = {"bound": True, "file": True, "shm": "created" if shm >= 0 else "refused",
        "key": "added" if key >= 0 else "refused"}
open("/tmp/redteam-listener-ready", "w").close()
"""
# Kept running (and cancelled at the end) while the cross-task probes look for it.
LISTENER = LISTENER_SETUP + "time.sleep(3600)\n"
# Run by ``docker exec`` inside the listener's own container (same network namespace):
# its readiness (the set-up's last step), then, once ready, one connect to its socket.
# It connects only once: the listener never accepts, so connections fill its backlog.
LISTENER_CHECK = r"""
import json, os, socket
if not os.path.exists("/tmp/redteam-listener-ready"):
    print(json.dumps({"ready": False}))
else:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect("\0redteam-listener")
        connect = "ok"
    except OSError as exc:
        connect = {111: "ECONNREFUSED", 2: "ENOENT"}.get(exc.errno, exc.errno)
    print(json.dumps({"ready": True, "connect": connect}))
"""
LISTENER_READY_TIMEOUT_S = 60.0
LISTENER_POLL_S = 0.2
# Where the suite writes its record unless asked for the tracked file.
RECORD_ENV = "REDTEAM_RECORD"
# The same set-up run once to its end, so that the run records what it achieved.
LISTENER_ONCE = LISTENER_SETUP + "return done\n"

TRIVIAL = "return [{'json': {'n': sum(i['json']['n'] for i in _items)}}]"


def docker_default_isolation(settings: Settings) -> IsolationConfig:
    """Our isolation with Docker's own default seccomp profile swapped in."""
    raw = DOCKER_DEFAULT_PROFILE.read_bytes()
    return dataclasses.replace(
        load_isolation(settings),
        seccomp_profile=DOCKER_DEFAULT_PROFILE,
        seccomp_json=json.dumps(json.loads(raw), separators=(",", ":")),
        seccomp_sha256=hashlib.sha256(raw).hexdigest(),
        policy_sha256=None,
    )


@dataclasses.dataclass
class Secrets:
    """What must never reach a task: the runner's canary and the broker's tokens."""

    canary: str
    auth_token: str
    grant_token: str

    def values(self) -> tuple[str, ...]:
        return (self.canary, self.auth_token, self.grant_token)

    def redact(self, text: str) -> str:
        for value, mark in zip(self.values(), ("<CANARY>", "<AUTH>", "<GRANT>"), strict=True):
            text = text.replace(value, mark)
        return text

    def found_in(self, text: str) -> list[str]:
        names = ("canary", "auth_token", "grant_token")
        return [name for name, value in zip(names, self.values(), strict=True) if value in text]


@dataclasses.dataclass
class SuiteRun:
    observations: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    serving: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    listeners: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Per listener: polled until ready, then one connect from inside its container.
    listener_control: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    listener_setup: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    inspections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    leaks: list[str] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0


def observation(report: TaskReport, seconds: float) -> dict[str, Any]:
    error = report.error
    return {
        "outcome": report.outcome.value,
        "stage": error.stage.value if error else None,
        "message": error.message if error else None,
        "description": (error.description[-2000:] if error else None),
        "result": report.result,
        "seconds": round(seconds, 2),
        "start": report.audit.get("details", {}).get("containerStart"),
    }


async def run_one(pipeline: TaskPipeline, probe: Probe) -> TaskReport:
    limits = dataclasses.replace(pipeline.limits, **probe.limits)
    request = TaskRequest(code=probe.code, limits=limits)
    running = asyncio.create_task(pipeline.run(request))
    if probe.action is not None:
        _, after_s = probe.action
        await asyncio.sleep(after_s)
        sandbox = pipeline.sandbox
        assert isinstance(sandbox, ContainerSandbox)
        await sandbox.cancel(request.task_id)
    return await asyncio.wait_for(running, limits.timeout_s + 60)


class Engine:
    """What the harness needs of the engine that makes the containers, beside the
    pipeline: look at every container of a runner id as the engine describes it (for
    secrets), ``python3 -c`` inside a task's running container (the listener's
    positive control), and the containers left."""

    name = "engine"

    def containers(self, runner_id: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def exec_python(self, runner_id: str, task_id: str, code: str) -> tuple[int, bytes] | None:
        """(exit code, stdout) of ``python3 -c code`` in the task's container; None: it
        does not run (yet)."""
        raise NotImplementedError

    def leftovers(self, runner_id: str) -> list[str]:
        raise NotImplementedError


class DockerEngine(Engine):
    name = "docker"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def _ours(self, runner_id: str, *labels: str, **filters: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.client.api.containers(
            all=True,
            filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={runner_id}", *labels]},
            **filters,
        )
        return found

    def containers(self, runner_id: str) -> list[dict[str, Any]]:
        described = []
        for container in self._ours(runner_id):
            try:
                info = self.client.api.inspect_container(container["Id"])
            except docker.errors.NotFound:
                continue
            config = info.get("Config") or {}
            described.append(
                {
                    "env": config.get("Env") or [],
                    "labels": config.get("Labels") or {},
                    "cmd": config.get("Cmd"),
                    "entrypoint": config.get("Entrypoint"),
                    "binds": (info.get("HostConfig") or {}).get("Binds"),
                    "mounts": [m.get("Source") for m in info.get("Mounts") or []],
                }
            )
        return described

    def exec_python(self, runner_id: str, task_id: str, code: str) -> tuple[int, bytes] | None:
        found = self.client.api.containers(
            filters={
                "label": [f"{LABEL_OWNER}={runner_id}", f"{LABEL_TASK}={task_id}"],
                "status": "running",
            }
        )
        if not found:
            return None
        api = self.client.api
        try:
            exec_id = api.exec_create(found[0]["Id"], ["python3", "-I", "-B", "-c", code])
            output = api.exec_start(exec_id)
        except docker.errors.APIError:
            return None  # created but not started yet, or gone: polled again
        return int(api.exec_inspect(exec_id)["ExitCode"]), bytes(output)

    def leftovers(self, runner_id: str) -> list[str]:
        return [c["Id"] for c in self._ours(runner_id)]


class OciEngine(Engine):
    """The OCI backend: its bundles (config.json and the ownership record) under the
    state directory, ``runc exec`` into a container, the runtime's list."""

    def __init__(self, name: str, state: Path, runtime: OciRuntime) -> None:
        self.name = name
        self.bundles = state / "bundles"
        self.runtime = runtime

    def _ours(self, runner_id: str) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for bundle in sorted(self.bundles.glob("*")) if self.bundles.is_dir() else []:
            try:
                record = json.loads((bundle / "record.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("labels", {}).get(LABEL_OWNER) == runner_id:
                found.append((bundle, record))
        return found

    def containers(self, runner_id: str) -> list[dict[str, Any]]:
        described = []
        for bundle, record in self._ours(runner_id):
            try:
                config = json.loads((bundle / "config.json").read_text())
            except (OSError, ValueError):
                continue
            described.append(
                {
                    "env": config["process"].get("env") or [],
                    "labels": record.get("labels") or {},
                    "cmd": config["process"].get("args"),
                    "mounts": [m.get("source") for m in config.get("mounts") or []],
                }
            )
        return described

    def exec_python(self, runner_id: str, task_id: str, code: str) -> tuple[int, bytes] | None:
        for bundle, record in self._ours(runner_id):
            if record.get("labels", {}).get(LABEL_TASK) != task_id:
                continue
            argv = self.runtime.argv(
                "exec", "--user", "10001:10001", bundle.name, "python3", "-I", "-B", "-c", code
            )
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            if b"not running" in done.stderr or b"does not exist" in done.stderr:
                return None
            return done.returncode, done.stdout
        return None

    def leftovers(self, runner_id: str) -> list[str]:
        return [bundle.name for bundle, _ in self._ours(runner_id)]


async def inspect_containers(engine: Engine, runner_id: str) -> dict[str, Any]:
    """Every container of this runner id as its engine describes it (env, labels, cmd)."""
    described = await asyncio.to_thread(engine.containers, runner_id)
    return {"containers": len(described), "text": json.dumps(described, sort_keys=True)}


def exec_in_task_container(
    engine: Engine, runner_id: str, task_id: str, code: str
) -> dict[str, Any] | None:
    """``python3 -c code`` in the running container of a cold task (None: not running yet).

    A cold pipeline creates each task's container with the task's id as a label.
    """
    answer = engine.exec_python(runner_id, task_id, code)
    if answer is None:
        return None
    exit_code, output = answer
    if exit_code != 0:
        return {"ready": False, "exec_exit": exit_code, "output": output.decode(errors="replace")}
    result: dict[str, Any] = json.loads(output)
    return result


async def start_listener(
    pipeline: TaskPipeline, engine: Engine, runner_id: str
) -> tuple[TaskRequest, asyncio.Task[TaskReport], dict[str, Any]]:
    """The listener task, once its set-up has finished; and the positive control.

    Polls (``docker exec`` in its container) until the set-up's last step is done,
    then connects once to its abstract socket from inside that container.
    """
    # Longer than the whole suite; cancelled at the end.
    request = TaskRequest(code=LISTENER, limits=dataclasses.replace(pipeline.limits, timeout_s=590))
    task = asyncio.create_task(pipeline.run(request))
    deadline = time.monotonic() + LISTENER_READY_TIMEOUT_S
    polls = 0
    control: dict[str, Any] = {"ready": False}
    while time.monotonic() < deadline and not task.done():
        polls += 1
        seen = await asyncio.to_thread(
            exec_in_task_container, engine, runner_id, request.task_id, LISTENER_CHECK
        )
        if seen is not None:
            control = seen
            if seen.get("ready"):
                break
        await asyncio.sleep(LISTENER_POLL_S)
    control["polls"] = polls
    control["listener_running"] = not task.done()
    return request, task, control


async def stop_listener(
    pipeline: TaskPipeline, request: TaskRequest, task: asyncio.Task[TaskReport]
) -> dict[str, Any]:
    sandbox = pipeline.sandbox
    assert isinstance(sandbox, ContainerSandbox)
    await sandbox.cancel(request.task_id)
    report = await asyncio.wait_for(task, 60)
    return observation(report, 0.0)


async def run_suite(
    factory: PipelineFactory,
    probes: list[Probe],
    *,
    settings: Settings,
    engine: Engine,
    secrets: Secrets,
    runner_id: str,
) -> SuiteRun:
    """Every probe in every mode it names; see the module docstring."""
    began = time.monotonic()
    run = SuiteRun()
    common: dict[str, Any] = {
        "warm": True,
        "pool_size": 2,
        "runner_id": runner_id,
        "auth_token": secrets.auth_token,
        "grant_token": secrets.grant_token,
    }
    async with AsyncExitStack() as stack:
        docker_default = docker_default_isolation(settings)
        pipelines = {
            "default": await stack.enter_async_context(factory(**common)),
            "guards_off": await stack.enter_async_context(factory(guards_off=True, **common)),
            "ablation": await stack.enter_async_context(
                factory(guards_off=True, isolation=docker_default, **common)
            ),
        }
        # The peer of the cross-task probes: ours for the first two modes, Docker's
        # default seccomp for the ablation. Each on a cold pipeline of the same
        # isolation, so that its container carries its task id (found for the exec).
        cold = {key: value for key, value in common.items() if key not in ("warm", "pool_size")}
        peers = {
            "ours": await stack.enter_async_context(factory(guards_off=True, **cold)),
            "docker": await stack.enter_async_context(
                factory(guards_off=True, isolation=docker_default, **cold)
            ),
        }
        for name, peer in peers.items():
            once = await peer.run(TaskRequest(code=LISTENER_ONCE))
            run.listener_setup[name] = observation(once, 0.0)
        listeners = {}
        for name, peer in peers.items():
            request, task, control = await start_listener(peer, engine, runner_id)
            listeners[name] = (request, task)
            run.listener_control[name] = control
        run.inspections.append(await inspect_containers(engine, runner_id))
        for mode in MODES:
            pipeline = pipelines[mode]
            for probe in probes:
                if mode not in probe.modes:
                    continue
                started = time.monotonic()
                report = await run_one(pipeline, probe)
                document = json.dumps(report.document(), default=str)
                run.leaks.extend(
                    f"{probe.id} [{mode}]: {name}" for name in secrets.found_in(document)
                )
                run.observations.setdefault(probe.id, {})[mode] = observation(
                    report, time.monotonic() - started
                )
        run.inspections.append(await inspect_containers(engine, runner_id))
        for name, (request, task) in listeners.items():
            run.listeners[name] = await stop_listener(peers[name], request, task)
        for mode, pipeline in pipelines.items():
            report = await pipeline.run(
                TaskRequest(code=TRIVIAL, items=[{"json": {"n": 1}}, {"json": {"n": 2}}])
            )
            run.serving[mode] = observation(report, 0.0)
    run.leftovers = await asyncio.to_thread(engine.leftovers, runner_id)
    for inspection in run.inspections:
        run.leaks.extend(
            f"container inspect: {name}" for name in secrets.found_in(inspection["text"])
        )
    run.wall_s = time.monotonic() - began
    return run


def record_paths(session_dir: Path, engine: str = "docker") -> list[Path]:
    """Where :func:`record` writes: the session's own file; with REDTEAM_RECORD=1 also
    the engine's tracked record (the source of ``scripts/redteam_report.py``)."""
    tracked = last_run(engine)
    paths = [session_dir / tracked.name]
    if os.environ.get(RECORD_ENV) == "1":
        paths.append(tracked)
    return paths


def record(
    run: SuiteRun,
    probes: list[Probe],
    secrets: Secrets,
    client: docker.DockerClient,
    *,
    facts: dict[str, str],
    paths: list[Path],
    engine: str = "docker",
    runtime: str = "",
) -> dict[str, Any]:
    """The machine-readable record of a run (secrets redacted), written to ``paths``."""
    version = client.version()
    entries = {}
    for probe in probes:
        modes: dict[str, dict[str, Any]] = {}
        for mode in probe.modes:
            observed = run.observations.get(probe.id, {}).get(mode)
            expect = probe.expects.get(mode)
            if expect is None:  # not judged on this host: recorded, with the reason
                modes[mode] = {
                    "expected": None,
                    "unjudged": probe.unjudged[mode],
                    "observed": observed,
                    "holds": None,
                }
                continue
            modes[mode] = {
                "expected": expect.describe(),
                "observed": observed,
                "holds": observed is not None and not expect.mismatches(observed),
            }
        entries[probe.id] = {
            "class": probe.klass,
            "title": probe.title,
            "threat": probe.threat,
            "layers": list(probe.layers),
            "note": probe.note,
            "modes": modes,
        }
    document = {
        "engine": engine,
        "runtime": runtime,
        "generatedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "wallSeconds": round(run.wall_s, 1),
        "docker": version.get("Version"),
        "kernel": version.get("KernelVersion"),
        "machine": facts["machine"],
        "hostFacts": {key: value for key, value in facts.items() if key != "machine"},
        "probes": entries,
        "serving": {mode: obs["outcome"] for mode, obs in run.serving.items()},
        "listeners": {name: obs["outcome"] for name, obs in run.listeners.items()},
        "listenerControl": {
            name: {"ready": c.get("ready"), "connect": c.get("connect")}
            for name, c in run.listener_control.items()
        },
        "listenerSetup": {name: obs["result"] for name, obs in run.listener_setup.items()},
        "containersInspected": sum(i["containers"] for i in run.inspections),
        "leftoverContainers": len(run.leftovers),
        "leaks": run.leaks,
    }
    text = secrets.redact(json.dumps(document, indent=1, sort_keys=True, default=str))
    for path in paths:
        path.write_text(text + "\n", encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result
