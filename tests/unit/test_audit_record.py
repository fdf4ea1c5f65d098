"""The audit record is one type, and its JSON is what it has always been, byte for byte.

Log stores, ``exec``'s document and the broker's result documents read these keys in
this order. The expected texts are what the three builders this type replaced
(``TaskPipeline._audit``, ``RunnerService._audit`` and ``_audit_failure``) wrote for
the same facts.
"""

from __future__ import annotations

from datetime import UTC, datetime

from runner.pipeline import AuditRecord, PipelineFacts, ServiceFacts, ServiceOutcome
from runner.sandbox.base import MIB, ErrorCode, Limits, Mode, Outcome, Stage

PIPELINE_RECORD = (
    '{"taskId": "task-1", "runnerId": "runner-ü", "startedAt": "2026-01-02T03:04:05.678+00:00", '
    '"mode": "per_item", "outcome": "user_error", "errorCode": "user_error", "stage": "run", '
    '"continueOnFailApplied": false, "containerId": "c1", "image": "img:1", '
    '"imageId": "sha256:abc", "limits": {"timeoutSeconds": 60.0, "memoryBytes": 134217728, '
    '"cpus": 1.0, "nanoCpus": 1000000000, "pids": 64, "tmpfsBytes": 16777216, '
    '"outputBytes": 16777216, "nofile": 256, "fsizeBytes": 16777216, "nproc": 4096, '
    '"codeBytes": 262144}, "policySha256": "p0l1cy", '
    '"isolation": {"seccomp": {"sha256": "feed"}, "backend": "docker"}, '
    '"durationsMs": {"analyze": 1.235, "poolWait": 2.0, "run": 20.123, "total": 543.22, '
    '"containerSetup": 2.0}, "details": {"containerStart": "warm", "x": [1, "é"]}}'
)
SERVICE_TAIL = (
    ', "brokerRunnerId": "BROKERID", "workflowId": "w1", "workflowName": "wf ü", '
    '"nodeId": "n1", "nodeName": "Code", "queueMs": 12.346}'
)
SHORT_LINE = (
    '{"event": "task_completed", "taskId": "task-1", "runnerId": "runner-ü", '
    '"brokerRunnerId": "BROKERID", "outcome": "rejected", "errorCode": "limit_above_ceiling", '
    '"stage": "setup", "containerId": null, "durationsMs": {"total": 500.0}, '
    '"workflowId": "w1", "workflowName": "wf ü", "nodeId": "n1", "nodeName": "Code"}'
)


def service_facts(queue_ms: float | None = None) -> ServiceFacts:
    return ServiceFacts(
        broker_runner_id="BROKERID",
        workflow_id="w1",
        workflow_name="wf ü",
        node_id="n1",
        node_name="Code",
        queue_ms=queue_ms,
    )


def pipeline_record() -> AuditRecord:
    return AuditRecord(
        task_id="task-1",
        runner_id="runner-ü",
        outcome=Outcome.USER_ERROR,
        error_code=Outcome.USER_ERROR.error_code,
        stage=Stage.RUN,
        container_id="c1",
        durations_ms={
            "analyze": 1.23456,
            "poolWait": 2.00049,
            "run": 20.1234567,
            "total": 543.21987,
            "containerSetup": 2.00049,
        },
        pipeline=PipelineFacts(
            started_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            mode=Mode.PER_ITEM,
            continue_on_fail_applied=False,
            image="img:1",
            image_id="sha256:abc",
            limits=Limits(memory_bytes=128 * MIB),
            policy_sha256="p0l1cy",
            isolation={"seccomp": {"sha256": "feed"}, "backend": "docker"},
            details={"containerStart": "warm", "x": [1, "é"]},
        ),
    )


def test_the_record_of_a_task_the_pipeline_took_is_the_document_audit_as_before() -> None:
    record = pipeline_record()
    assert record.log_line() == PIPELINE_RECORD  # no service facts: no event, no ids


def test_the_services_line_for_it_adds_its_facts_after_the_pipelines_as_before() -> None:
    line = pipeline_record().with_service(service_facts(queue_ms=12.3456)).log_line()
    assert line == '{"event": "task_completed", ' + PIPELINE_RECORD[1:-1] + SERVICE_TAIL


def test_the_short_line_of_a_task_no_pipeline_took_is_as_before() -> None:
    record = AuditRecord(
        task_id="task-1",
        runner_id="runner-ü",
        outcome=ServiceOutcome.REJECTED,
        error_code=ErrorCode.LIMIT_ABOVE_CEILING,
        stage=Stage.SETUP,
        container_id=None,
        durations_ms={"total": 500.0},
        service=service_facts(),
    )
    assert record.log_line() == SHORT_LINE
