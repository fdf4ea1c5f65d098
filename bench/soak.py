"""``make soak``: many tasks through the embedded broker and one runner, nothing lost.

Pushes ``--tasks`` tasks (default 1000) through the embedded broker
(:func:`runner.broker_server.server.running_broker`, in this process) to one
``sandbox-runner serve`` process (started here exactly as an operator would),
``--concurrency`` at a time (default 4), mixing four kinds in a fixed rotation:

- ``ok``: returns a value computed from its input (and prints);
- ``raise``: raises, expected ``user_error``;
- ``timeout``: sleeps past a 1 s task timeout, expected ``timeout``;
- ``memory``: allocates past the memory limit, expected ``memory_limit_exceeded``.

It reports five figures and exits 1 when any of the first three is not zero:

1. tasks **lost**: submitted, but no completion on the wire from the runner (or not
   finished at all by the deadline);
2. tasks **duplicated**: more than one completion on the wire for one task id
   (:class:`CountingBroker` counts the completions runners sent, per task id);
3. containers **leaked**: after the last task and before the runner stops, containers
   with this run's owner label beyond the warm pool's idle slots (``--pool-size``,
   default 2) once removals had up to 30 s to finish (``during run``), plus
   containers with that label left after the runner stopped (``after stop``); the
   runner's shutdown removes its own containers, so only the first count sees a task
   container it forgot during the run;
4. the runner process's **memory** (RSS) once it is ready, and at the end;
5. **latency** p50/p95 (submission to result document), overall and per kind.

Tasks whose outcome is not the one their kind expects are counted and listed too
(``unexpected``), and fail the run as well. ``--json-out`` writes the report as JSON
(the short version in the test suite reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from pydantic import BaseModel

from bench.stats import percentile
from runner.broker_server.core import Broker
from runner.broker_server.runners import RunnerConnection
from runner.broker_server.server import RunningBroker, running_broker
from runner.broker_server.submission import Submission, TaskLimits
from runner.broker_server.tasks import BrokerTask
from runner.protocol.messages import TaskDone, TaskErrorMessage
from runner.sandbox.base import Mode
from runner.sandbox.labels import LABEL_MANAGED, LABEL_OWNER
from runner.settings import Settings
from runner.testing import ServeProcess

AUTH_TOKEN = "soak-auth-token-0123456789"  # noqa: S105 - a loopback broker of its own
TIMEOUT_TASK_S = 1.0
POOL_SIZE = 2  # SANDBOX_POOL_SIZE for the runner: the idle slots allowed to remain
LEAK_SETTLE_S = 30.0  # how long the removals of the last tasks' containers may take

# kind -> (code, limits, expected outcome code); ``{n}`` is the task's index.
KINDS: dict[str, tuple[str, TaskLimits, str]] = {
    "ok": (
        "print('task', {n})\nreturn [{{'json': {{'n': {n}, 'sum': sum(range({n}))}}}}]",
        TaskLimits(),
        "success",
    ),
    "raise": ("raise ValueError('soak failure {n}')", TaskLimits(), "user_error"),
    "timeout": (
        "import time\ntime.sleep(5)\nreturn {n}",
        TaskLimits(timeout_s=TIMEOUT_TASK_S),
        "timeout",
    ),
    "memory": (
        # 512 MiB, every page touched, against the policy's default 256 MiB limit.
        "blob = b'x' * (512 * 1024 * 1024)\nreturn len(blob) + {n}",
        TaskLimits(),
        "memory_limit_exceeded",
    ),
}
# Of every 10 tasks: 6 succeed, 2 raise, 1 times out, 1 bombs the memory.
ROTATION = ("ok", "raise", "ok", "timeout", "ok", "raise", "ok", "memory", "ok", "ok")


@dataclass
class Outcome:
    index: int
    kind: str
    task_id: str = ""
    latency_s: float | None = None
    code: str | None = None  # "success" or the error code; None: never finished


@dataclass
class SoakReport:
    tasks: int
    concurrency: int
    wall_s: float
    lost: list[str]
    duplicated: list[str]
    leaked: list[str]  # owner-labelled containers left after the runner stopped
    unexpected: list[dict[str, Any]]
    rss_start_mib: float
    rss_end_mib: float
    latency_ms: dict[str, dict[str, float]]
    outcomes: dict[str, dict[str, int]]
    runner_exit_code: int | None
    # Owner-labelled containers beyond the pool's idle slots, the runner still running.
    leaked_during_run: list[str] = field(default_factory=list)
    pool_size: int = POOL_SIZE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.leaked_during_run or self.leaked or self.unexpected
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "concurrency": self.concurrency,
            "wallS": round(self.wall_s, 1),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "leakedContainers": len(self.leaked_during_run) + len(self.leaked),
            "leakedDuringRun": len(self.leaked_during_run),
            "leakedAfterStop": len(self.leaked),
            "unexpectedOutcomes": len(self.unexpected),
            "runnerRssMiB": {"start": self.rss_start_mib, "end": self.rss_end_mib},
            "latencyMs": self.latency_ms,
            "outcomes": self.outcomes,
            "runnerExitCode": self.runner_exit_code,
            "details": {
                "lostTaskIds": self.lost,
                "duplicatedTaskIds": self.duplicated,
                "leakedDuringRunContainerIds": self.leaked_during_run,
                "leakedContainerIds": self.leaked,
                "unexpected": self.unexpected[:20],
                **self.extra,
            },
        }

    def summary(self) -> str:
        overall = self.latency_ms.get("all")
        latency = (
            f"p50 {overall['p50']:.0f} ms, p95 {overall['p95']:.0f} ms"
            if overall
            else "none (no task finished)"
        )
        leaked = len(self.leaked_during_run) + len(self.leaked)
        lines = [
            f"soak: {self.tasks} tasks at concurrency {self.concurrency} in {self.wall_s:.0f} s",
            f"  lost:                {len(self.lost)}",
            f"  duplicated:          {len(self.duplicated)}",
            f"  containers leaked:   {leaked} ({len(self.leaked_during_run)} during run, "
            f"beyond {self.pool_size} idle pool slots; {len(self.leaked)} after stop)",
            f"  runner RSS:          {self.rss_start_mib:.1f} MiB at start, "
            f"{self.rss_end_mib:.1f} MiB at end",
            f"  latency:             {latency}",
            f"  unexpected outcomes: {len(self.unexpected)}",
        ]
        for kind, figures in self.latency_ms.items():
            if kind != "all":
                lines.append(
                    f"    {kind:<8} p50 {figures['p50']:>6.0f} ms  p95 {figures['p95']:>6.0f} ms"
                    f"  outcomes {self.outcomes.get(kind, {})}"
                )
        lines.append("soak: OK" if self.is_ok else "soak: FAILED")
        return "\n".join(lines)


def expected_result(kind: str, n: int) -> Any:
    return [{"json": {"n": n, "sum": sum(range(n))}}] if kind == "ok" else None


async def _wait_for(predicate: Any, timeout_s: float, what: str, runner: ServeProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if runner.process.poll() is not None:
            tail = "\n".join(runner.lines)
            raise RuntimeError(f"the runner exited early ({runner.process.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class CountingBroker(Broker):
    """The broker core, counting the completions runners send (``runner:taskdone`` and
    ``runner:taskerror``) per task id, whether the broker knows the task or not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.completions: collections.Counter[str] = collections.Counter()

    def runner_message(self, connection: RunnerConnection, message: BaseModel) -> None:
        if isinstance(message, TaskDone | TaskErrorMessage):
            self.completions[message.task_id] += 1
        super().runner_message(connection, message)


async def _run_one(running: RunningBroker, outcome: Outcome, deadline: float) -> None:
    code, limits, _ = KINDS[outcome.kind]
    began = time.monotonic()
    task = running.broker.submit(
        Submission(
            tenant="soak",
            code=code.format(n=outcome.index),
            items=[{"json": {"i": outcome.index}}],
            mode=Mode.ALL_ITEMS,
            limits=limits,
        )
    )
    outcome.task_id = task.task_id
    if not await running.driver.wait_finished(task, max(0.1, deadline - time.monotonic())):
        return
    outcome.latency_s = time.monotonic() - began
    outcome.code = _code_of(task)
    document = task.document or {}
    if outcome.code == "success" and document.get("result") != expected_result(
        outcome.kind, outcome.index
    ):
        outcome.code = "wrong_result"


def owned_containers(client: docker.DockerClient, owner: str) -> list[dict[str, Any]]:
    """Every container (running or not) with our labels and this run's owner."""
    found: list[dict[str, Any]] = client.api.containers(
        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
    )
    return found


async def containers_beyond_pool(
    client: docker.DockerClient, owner: str, pool_size: int, settle_s: float = LEAK_SETTLE_S
) -> list[str]:
    """With no task in flight, only the warm pool's idle slots may remain: polls until at
    most ``pool_size`` owned containers are left (the last tasks' containers are removed
    in the background), at most ``settle_s``; returns the ids of those beyond it, the
    oldest first (idle slots are the most recently started)."""
    deadline = time.monotonic() + settle_s
    while True:
        found = await asyncio.to_thread(owned_containers, client, owner)
        if len(found) <= pool_size or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    oldest_first = sorted(found, key=lambda c: (c.get("Created", 0), str(c["Id"])))
    return [str(c["Id"]) for c in oldest_first[: max(0, len(found) - pool_size)]]


def _code_of(task: BrokerTask) -> str:
    document = task.document or {}
    if document.get("status") == "success":
        return "success"
    return str((document.get("error") or {}).get("code"))


async def soak(
    tasks: int = 1000,
    concurrency: int = 4,
    *,
    deadline_s: float | None = None,
    progress: bool = True,
    pool_size: int = POOL_SIZE,
) -> SoakReport:
    owner = f"soak-{uuid.uuid4().hex[:8]}"
    # The default store (SQLite), in a file of this run's own: not the machine's state
    # directory, which every run would share (its leftovers recovered by the next).
    store_dir = Path(tempfile.mkdtemp(prefix="soak-broker-"))
    settings = Settings(
        broker_host="127.0.0.1",
        broker_port=0,
        auth_token=AUTH_TOKEN,
        graceful_shutdown_timeout_s=10,
        runner_id=owner,
        broker_store=f"sqlite:///{store_dir / 'broker-tasks.sqlite3'}",
    )
    deadline_s = deadline_s or 120 + tasks * 1.5
    client = docker.from_env(timeout=60)
    outcomes = [Outcome(i, ROTATION[i % len(ROTATION)]) for i in range(tasks)]
    try:
        async with running_broker(
            settings, auth_token=AUTH_TOKEN, broker_factory=CountingBroker
        ) as running:
            broker = running.broker
            assert isinstance(broker, CountingBroker)
            runner = ServeProcess(
                running.url,
                AUTH_TOKEN,
                {
                    "SANDBOX_RUNNER_ID": owner,
                    "N8N_RUNNERS_MAX_CONCURRENCY": str(concurrency),
                    "SANDBOX_POOL_SIZE": str(pool_size),
                    "N8N_RUNNERS_GRACEFUL_SHUTDOWN_TIMEOUT": "10",
                    "N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED": "false",
                },
                keep_lines=2000,
            )
            exit_code: int | None = None
            try:
                await _wait_for(lambda: broker.runner_ids(), 120, "the runner to register", runner)
                await asyncio.sleep(1.0)  # its warm pool fills
                rss_start = runner.rss_mib()
                began = time.monotonic()
                deadline = began + deadline_s
                gate = asyncio.Semaphore(concurrency)
                done = 0

                async def one(outcome: Outcome) -> None:
                    nonlocal done
                    async with gate:
                        await _run_one(running, outcome, deadline)
                    done += 1
                    if progress and done % 100 == 0:
                        print(f"soak: {done}/{tasks} tasks done", file=sys.stderr, flush=True)

                async with asyncio.TaskGroup() as group:
                    for outcome in outcomes:
                        group.create_task(one(outcome))
                wall_s = time.monotonic() - began
                rss_end = runner.rss_mib()
                # Before the runner stops: its shutdown removes whatever it still has, so
                # a container forgotten during the run would not show after it.
                leaked_during_run = await containers_beyond_pool(client, owner, pool_size)
            finally:
                exit_code = await asyncio.to_thread(runner.stop, 60)
            counts = broker.completions
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    leaked = [str(c["Id"]) for c in owned_containers(client, owner)]
    client.close()
    lost = [o.task_id or f"#{o.index}" for o in outcomes if o.code is None or not counts[o.task_id]]
    duplicated = [o.task_id for o in outcomes if counts[o.task_id] > 1]
    unexpected = [
        {"index": o.index, "taskId": o.task_id, "kind": o.kind, "code": o.code}
        for o in outcomes
        if o.code is not None and o.code != KINDS[o.kind][2]
    ]
    latency: dict[str, dict[str, float]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for kind in ("all", *KINDS):
        values = [
            o.latency_s * 1000
            for o in outcomes
            if o.latency_s is not None and kind in ("all", o.kind)
        ]
        if values:
            latency[kind] = {
                "p50": round(percentile(values, 50), 1),
                "p95": round(percentile(values, 95), 1),
                "max": round(max(values), 1),
                "mean": round(statistics.fmean(values), 1),
            }
        if kind != "all":
            by_kind[kind] = dict(
                collections.Counter(str(o.code) for o in outcomes if o.kind == kind)
            )
    return SoakReport(
        tasks=tasks,
        concurrency=concurrency,
        wall_s=wall_s,
        lost=lost,
        duplicated=duplicated,
        leaked=leaked,
        leaked_during_run=leaked_during_run,
        pool_size=pool_size,
        unexpected=unexpected,
        rss_start_mib=rss_start,
        rss_end_mib=rss_end,
        latency_ms=latency,
        outcomes=by_kind,
        runner_exit_code=exit_code,
        extra={"runnerLogTail": list(runner.lines)[-20:]} if exit_code != 0 else {},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks to push (default 1000)")
    parser.add_argument("--concurrency", type=int, default=4, help="at once (default 4)")
    parser.add_argument("--json-out", type=Path, help="write the report as JSON here")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=POOL_SIZE,
        help=f"the runner's warm pool (SANDBOX_POOL_SIZE): idle slots allowed to remain "
        f"after the last task (default {POOL_SIZE})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    report = asyncio.run(
        soak(args.tasks, args.concurrency, progress=not args.quiet, pool_size=args.pool_size)
    )
    print(report.summary())
    if args.json_out:
        args.json_out.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if report.runner_exit_code != 0:
        print(f"soak: the runner exited with {report.runner_exit_code}", file=sys.stderr)
    return 0 if report.is_ok and report.runner_exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
