"""Prometheus metrics of the runner service and of the embedded broker.

Owns: the metric names, labels and buckets, and turning what happened (a task
report, a retry, the broker's state) into samples. Every metric lives in a
:class:`prometheus_client.CollectorRegistry` handed in by the caller (one per
service or broker, never the process-global default registry), so two of them in
one process (``up``, tests) never collide.

Runner (``serve``; scraped at ``/metrics`` on the health-check server):

- ``sandbox_runner_tasks_total{outcome, error_code}``: finished tasks
- ``sandbox_runner_queue_wait_seconds``: accepted by the runner -> its pipeline starts
- ``sandbox_runner_container_start_seconds{start}``: container set-up seen by the task
  (``warm``: the hand-over of a pre-started one; ``cold``: create + attach + start)
- ``sandbox_runner_task_run_seconds``: the code running in its container
- ``sandbox_runner_task_duration_seconds``: the whole task, analyzer to result
- ``sandbox_runner_retries_total{cause}``: container set-up retries and broker reconnects
- ``sandbox_runner_running_tasks``, ``sandbox_runner_open_offers`` (gauges)
- ``sandbox_runner_policy_info{policy_sha256, seccomp_sha256, image, runner_id}``

Broker (``broker``/``up``; ``/metrics`` on its HTTP port):

- ``sandbox_broker_tasks_submitted_total``, ``sandbox_broker_tasks_total{status, error_code}``
- ``sandbox_broker_queue_wait_seconds``: submitted -> accepted by a runner
- ``sandbox_broker_task_duration_seconds``: accepted -> finished
- ``sandbox_broker_requeues_total{cause}``: a task handed back to the queue
- ``sandbox_broker_retries_total{error_code}``: a failed attempt tried again (its policy)
- ``sandbox_broker_dead_letters_total{error_code}``: a task whose policy gave up on it
- ``sandbox_broker_offers_total``: offers received from runners
- gauges: ``sandbox_broker_runners``, ``sandbox_broker_open_offers``,
  ``sandbox_broker_queued_tasks``, ``sandbox_broker_running_tasks``

Must not import docker, asyncio or the broker/service modules (they import this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds. Warm hand-overs take milliseconds, cold starts a few hundred, a daemon
# under load seconds; tasks run up to the timeout ceiling (10 min).
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


def _seconds(durations_ms: Mapping[str, Any], name: str) -> float | None:
    value = durations_ms.get(name)
    return float(value) / 1000 if isinstance(value, int | float) else None


class RunnerMetrics:
    """The runner service's metrics (``serve``, and the runner half of ``up``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = Counter(
            "sandbox_runner_tasks",
            "Tasks finished by this runner, by outcome and error code ('' on success).",
            ["outcome", "error_code"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sandbox_runner_queue_wait_seconds",
            "From the runner accepting a task to its pipeline starting.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.container_start = Histogram(
            "sandbox_runner_container_start_seconds",
            "Container set-up a task waited for: warm (pool hand-over) or cold.",
            ["start"],
            buckets=START_BUCKETS,
            registry=registry,
        )
        self.run = Histogram(
            "sandbox_runner_task_run_seconds",
            "The task's code running in its container.",
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "sandbox_runner_task_duration_seconds",
            "A whole task: analyzer, container, result.",
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "sandbox_runner_retries",
            "Retries of container set-up and broker connections, by cause.",
            ["cause"],
            registry=registry,
        )
        self.running = Gauge(
            "sandbox_runner_running_tasks", "Tasks running now.", registry=registry
        )
        self.open_offers = Gauge(
            "sandbox_runner_open_offers", "Offers this runner has open now.", registry=registry
        )
        self.policy = Info(
            "sandbox_runner_policy",
            "The policy bundle and image every task of this runner runs under.",
            registry=registry,
        )

    def set_policy(
        self, *, policy_sha256: str | None, seccomp_sha256: str, image: str, runner_id: str
    ) -> None:
        self.policy.info(
            {
                "policy_sha256": policy_sha256 or "",
                "seccomp_sha256": seccomp_sha256,
                "image": image,
                "runner_id": runner_id,
            }
        )

    def track_offers(self, count: Callable[[], int]) -> None:
        self.open_offers.set_function(lambda: float(count()))

    def retry(self, cause: str) -> None:
        self.retries.labels(cause=cause).inc()

    def task_finished(
        self,
        *,
        outcome: str,
        error_code: str | None,
        audit: Mapping[str, Any] | None,
        queue_wait_s: float | None,
    ) -> None:
        """One finished task (``audit`` is its audit record; None when it never ran)."""
        self.tasks.labels(outcome=outcome, error_code=error_code or "").inc()
        if queue_wait_s is not None:
            self.queue_wait.observe(queue_wait_s)
        if not audit:
            return
        durations = audit.get("durationsMs") or {}
        details = audit.get("details") or {}
        setup = _seconds(durations, "containerSetup")
        if setup is not None:
            start = str(details.get("containerStart") or "cold")
            self.container_start.labels(start=start).observe(setup)
        run = _seconds(durations, "run")
        if run is not None:
            self.run.observe(run)
        total = _seconds(durations, "total")
        if total is not None:
            self.duration.observe(total)


class BrokerState(Collector):
    """Gauges read from the broker at scrape time (nothing to keep in sync)."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        state = self._read()
        for name, documentation in (
            ("runners", "Registered runners connected now."),
            ("open_offers", "Live offers of connected runners."),
            ("queued_tasks", "Tasks waiting for a runner."),
            ("running_tasks", "Tasks offered to or running on a runner."),
        ):
            yield GaugeMetricFamily(
                f"sandbox_broker_{name}", documentation, value=float(state.get(name, 0))
            )


class BrokerMetrics:
    """The embedded broker's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.submitted = Counter(
            "sandbox_broker_tasks_submitted",
            "Tasks submitted through the HTTP API.",
            registry=registry,
        )
        self.tasks = Counter(
            "sandbox_broker_tasks",
            "Tasks finished, by status and error code ('' on success).",
            ["status", "error_code"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sandbox_broker_queue_wait_seconds",
            "From submission to a runner accepting the task.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "sandbox_broker_task_duration_seconds",
            "From a runner accepting the task to its result.",
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.requeues = Counter(
            "sandbox_broker_requeues",
            "Tasks handed back to the queue, by cause.",
            ["cause"],
            registry=registry,
        )
        self.offers = Counter(
            "sandbox_broker_offers", "Offers received from runners.", registry=registry
        )
        # error_code: one of the retry allowlist's few codes (never a tenant, never a
        # code a runner made up: only those are retried), so the labels stay bounded.
        self.retries = Counter(
            "sandbox_broker_retries",
            "Failed attempts tried again by the task's retry policy, by the attempt's code.",
            ["error_code"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "sandbox_broker_dead_letters",
            "Tasks whose retry policy gave up (status dead), by the last attempt's code.",
            ["error_code"],
            registry=registry,
        )
        self.prints_dropped = Counter(
            "sandbox_broker_prints_dropped",
            "Print entries a runner sent beyond the broker's per-task cap (calls or bytes).",
            registry=registry,
        )
        self.stale_results = Counter(
            "sandbox_broker_stale_results",
            "Results of an older attempt of a task (its lease died with a broker), dropped.",
            registry=registry,
        )
        self.store_errors = Counter(
            "sandbox_broker_store_errors",
            "Steps of a task the broker's store failed to record (the broker went on).",
            registry=registry,
        )
        # limit: one of the worker limits or '' (a bounded set; never a tenant).
        self.schema_worker_checks = Counter(
            "sandbox_broker_schema_worker_checks",
            "Callers' schema checks made in a schema worker process, by the limit one hit "
            "('' for none: it answered).",
            ["limit"],
            registry=registry,
        )

    def watch(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose the broker's current state (runners, offers, queue) as gauges."""
        self.registry.register(BrokerState(read))


__all__ = [
    "CONTENT_TYPE",
    "BrokerMetrics",
    "CollectorRegistry",
    "RunnerMetrics",
    "exposition",
]
