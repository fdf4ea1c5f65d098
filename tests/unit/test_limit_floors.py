"""Limits that cannot round to nothing: every limit has a floor, checked wherever a
limit enters (policy bundle, settings, the broker's per-task request, the HTTP API,
the pipeline), and the CPU quota is rendered exactly (``NanoCpus``, never 0).

b3a21b2 took ``cpus: 1e-10`` everywhere: ``int(1e-10 * 1e9) == 0``, Docker reads a
zero ``NanoCpus`` as "no limit", and the task ran with ``cpu.cfs_quota_us`` -1 while
its audit record said ``cpus: 1e-10``.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from test_broker_api import make

from runner.broker_server.app import TaskCreate
from runner.errors import ConfigurationError, LimitAboveCeiling
from runner.pipeline import check_requested_limits, per_task
from runner.policy import load_bundle, load_policy, resolve_policy
from runner.protocol.settings import TaskLimitsRequest
from runner.sandbox.base import MAXIMUM_CODE_BYTES, MIB, MINIMUM_LIMITS, Limits
from runner.service import RunnerService
from runner.settings import PROJECT_ROOT, Settings

FIXTURES = PROJECT_ROOT / "tests" / "fixtures"


# -- rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "nano_cpus"),
    [
        (1.0, 1_000_000_000),
        (0.01, 10_000_000),  # the minimum: Docker's 1 ms quota per 100 ms period
        (0.57, 570_000_000),  # int() would say 569999999
        (1e-10, 1),  # below the floor (refused everywhere): still never 0
    ],
)
def test_nano_cpus_is_rounded_and_never_zero(cpus: float, nano_cpus: int) -> None:
    assert Limits(cpus=cpus).nano_cpus == nano_cpus


def test_the_audit_record_says_what_was_enforced() -> None:
    audit = Limits(cpus=0.57).as_audit()
    assert audit["cpus"] == 0.57
    assert audit["nanoCpus"] == 570_000_000
    assert audit["codeBytes"] == Limits().code_bytes


def test_every_limit_has_a_floor_and_the_defaults_clear_it() -> None:
    assert Limits().below_minimum() == []
    assert MINIMUM_LIMITS.below_minimum() == []
    for item in fields(Limits):
        assert getattr(MINIMUM_LIMITS, item.name) > 0, item.name
    assert MINIMUM_LIMITS.cpus == 0.01
    assert MINIMUM_LIMITS.memory_bytes == 16 * MIB  # measured: the agent needs ~12 MiB
    assert replace(Limits(), cpus=1e-10, tmpfs_bytes=0).below_minimum() == [
        "cpus 1e-10 < 0.01",
        "tmpfs_bytes 0 < 1.04858e+06",
    ]


# -- the policy bundle ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("cpus_below_minimum", "[limits] cpus.default = 1e-10 is below the minimum 0.01"),
        ("memory_below_minimum", "[limits] memory_mb.default = 8 is below the minimum 16"),
        ("nofile_below_minimum", "[limits] nofile.default = 8 is below the minimum 32"),
        ("canary_below_minimum", "[selfcheck] canary_timeout_s = 0.001 is below the minimum 1"),
        ("code_bytes_above_maximum", "code_bytes.ceiling = 8388608 is above the most"),
    ],
)
def test_the_bundle_refuses_a_limit_below_its_floor(case: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        load_bundle(FIXTURES / "bad_policies" / case)
    assert fragment in str(refused.value)


def test_a_bundle_loaded_for_diagnosis_still_never_yields_limits_below_the_floor() -> None:
    bundle = load_bundle(FIXTURES / "bad_policies" / "cpus_below_minimum", enforce=False)
    with pytest.raises(ConfigurationError, match=re.escape("cpus 1e-10 < 0.01")):
        resolve_policy(bundle, Settings())


def test_the_shipped_bundle_has_a_code_size_ceiling() -> None:
    bound = load_bundle(PROJECT_ROOT / "policies").config.limits.code_bytes
    assert (bound.default, bound.ceiling) == (256 * 1024, 1024 * 1024)
    assert bound.ceiling <= MAXIMUM_CODE_BYTES


def test_the_timeout_flag_has_a_floor_too() -> None:
    policy = load_policy(Settings())
    with pytest.raises(ConfigurationError, match="below the minimum timeout of 1 s"):
        policy.check_timeout(0.001, "--timeout")
    with pytest.raises(ConfigurationError):
        policy.check_timeout(float("nan"), "--timeout")
    assert policy.check_timeout(1.0, "--timeout") == 1.0


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SANDBOX_CPUS", "1e-10"),
        ("SANDBOX_CPUS", "0"),
        ("N8N_RUNNERS_TASK_TIMEOUT", "0.001"),
        ("SANDBOX_MEMORY_MB", "8"),
        ("SANDBOX_PIDS_LIMIT", "2"),
        ("SANDBOX_TMPFS_MB", "0"),
        ("SANDBOX_OUTPUT_BYTES", "10"),
        ("SANDBOX_NOFILE", "8"),
        ("SANDBOX_FSIZE_MB", "0"),
        ("SANDBOX_NPROC", "1"),
        ("SANDBOX_CODE_BYTES", "10"),
    ],
)
def test_settings_refuse_a_limit_below_its_floor(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match="greater than or equal to"):
        Settings()


def test_settings_may_lower_code_bytes_and_the_pipeline_limits_follow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOX_CODE_BYTES", "4096")
    assert load_policy(Settings()).limits.code_bytes == 4096
    monkeypatch.setenv("SANDBOX_CODE_BYTES", str(2 * 1024 * 1024))
    with pytest.raises(ConfigurationError, match="above the policy ceiling"):
        load_policy(Settings())


# -- the broker's per-task request (runner side) -------------------------------------------


def limits_for(requested: TaskLimitsRequest) -> Limits | None:
    # limits_for reads only the pipeline's limits: no service needs to run.
    service = SimpleNamespace(pipeline=SimpleNamespace(limits=Limits()))
    return RunnerService.limits_for(service, requested)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("requested", "fragment"),
    [
        (TaskLimitsRequest(cpus=1e-10), "cpus 1e-10 is below the minimum of 0.01"),
        (TaskLimitsRequest(memory_mb=8), "memoryMb 8 is below the minimum of 16"),
        (TaskLimitsRequest(timeout_seconds=0.01), "timeoutSeconds 0.01 is below the minimum of 1"),
    ],
)
def test_the_runner_refuses_a_per_task_limit_below_its_floor(
    requested: TaskLimitsRequest, fragment: str
) -> None:
    with pytest.raises(LimitAboveCeiling, match=fragment):
        limits_for(requested)


def test_one_ceiling_check_limit_by_limit_the_ceiling_first_in_the_callers_words() -> None:
    ceilings, floors = per_task(60, 256, 1), per_task(1, 16, 0.01)

    def refusal(name: str, value: float, ceiling: float) -> str:
        return f"{name} {value:g} > {ceiling:g}, in the caller's words"

    # The timeout is checked before the memory: its floor's refusal comes first.
    with pytest.raises(LimitAboveCeiling, match=r"^timeoutSeconds 0.5 is below the minimum of 1$"):
        check_requested_limits(per_task(0.5, 999, None), ceilings, refusal, floors=floors)
    with pytest.raises(LimitAboveCeiling, match=r"^memoryMb 999 > 256, in the caller's words$"):
        check_requested_limits(per_task(None, 999, None), ceilings, refusal, floors=floors)
    # Without floors (the API's model has them), a tiny value is the caller's to refuse.
    check_requested_limits(per_task(0.5, None, None), ceilings, refusal)
    # Nothing asked, or no ceiling known: nothing to refuse.
    check_requested_limits(per_task(None, None, None), ceilings, refusal, floors=floors)
    check_requested_limits(per_task(900, None, None), per_task(None, None, None), refusal)


def test_the_runner_takes_a_per_task_limit_at_its_floor() -> None:
    limits = limits_for(TaskLimitsRequest(cpus=0.01, memory_mb=16, timeout_seconds=1))
    assert limits is not None
    assert (limits.cpus, limits.nano_cpus, limits.memory_bytes) == (0.01, 10_000_000, 16 * MIB)


# -- the HTTP API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"code": "return 1", "cpus": 1e-10}, "cpus"),
        ({"code": "return 1", "cpus": 0}, "cpus"),
        ({"code": "return 1", "memoryMb": 8}, "memoryMb"),
        ({"code": "return 1", "timeoutSeconds": 0.001}, "timeoutSeconds"),
    ],
)
async def test_the_api_answers_422_for_a_limit_below_its_floor(
    body: dict[str, object], field: str
) -> None:
    client, _ = make(max_request_bytes=16 * MIB)
    async with client:
        response = await client.post(
            "/v1/tasks", json=body, headers={"Authorization": "Bearer key-a"}
        )
    assert response.status_code == 422, response.text
    assert field in response.text
    assert "greater than or equal to" in response.text


async def test_the_api_answers_422_for_code_no_policy_accepts() -> None:
    client, _ = make(max_request_bytes=16 * MIB)
    async with client:
        response = await client.post(
            "/v1/tasks",
            json={"code": "x = 1\n" * 1_400_000},  # the 8 MB
            headers={"Authorization": "Bearer key-a"},
        )
    assert response.status_code == 422, response.text[:500]
    assert f"at most {MAXIMUM_CODE_BYTES} characters" in response.text


def test_the_api_model_carries_the_floors_in_its_schema() -> None:
    schema = TaskCreate.model_json_schema(by_alias=True)["properties"]
    assert schema["cpus"]["anyOf"][0]["minimum"] == 0.01
    assert schema["memoryMb"]["anyOf"][0]["minimum"] == 16
    assert schema["timeoutSeconds"]["anyOf"][0]["minimum"] == 1
    assert schema["code"]["maxLength"] == MAXIMUM_CODE_BYTES


def test_fixture_cases_are_copies_of_the_good_bundle() -> None:
    # The new cases differ from good_policy in the one line they test (so the rule they
    # name is the reason they fail): their other files are the good bundle's.
    for case in ("cpus_below_minimum", "code_bytes_missing", "selfcheck_cpu_limit_missing"):
        folder = FIXTURES / "bad_policies" / case
        for name in ("seccomp/task.json", "apparmor/sandbox-task"):
            good = (FIXTURES / "good_policy" / name).read_bytes()
            assert (folder / name).read_bytes() == good
