"""``broker:tasksettings.settings``: what a task asks for, validated at the trust boundary.

n8n's fields with n8n's defaults (reference 5.1), plus two optional extensions our
broker sends: ``limits`` (per-task timeout, memory and CPUs, which the runner checks
against its own ceilings) and ``tenant`` (whose task it is: the runner applies that
tenant's profile from its own policy bundle, never limits from the broker). A stock
n8n never sends them, and its tasks get the runner's defaults. Errors use n8n's texts where
it has them ("Missing field in task settings message: 'code'", "Unknown nodeMode: X").
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator

from runner.protocol.messages import WireModel
from runner.sandbox.base import Mode

#: The longest tenant name the settings may carry (a log and audit field, not a key).
TENANT_MAX_CHARS = 256


class TaskLimitsRequest(WireModel):
    timeout_seconds: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    cpus: float | None = Field(None, gt=0)


class TaskSettings(WireModel):
    code: str
    node_mode: Mode
    items: list[Any]
    continue_on_fail: bool = False
    workflow_name: str = "Unknown"
    workflow_id: str = "Unknown"
    node_name: str = "Unknown"
    node_id: str = "Unknown"
    query: Any = None
    workflow_mode: str | None = None
    limits: TaskLimitsRequest | None = None
    # Only a name: what the tenant may do is the runner's own bundle's to say.
    tenant: str | None = Field(None, min_length=1, max_length=TENANT_MAX_CHARS)

    @field_validator("node_mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> Mode:
        if not isinstance(value, str):
            raise ValueError(f"Unknown nodeMode: {value!r}")
        return Mode.parse(value)


def parse_task_settings(raw: Any) -> TaskSettings:
    """Validate raw settings; raise ``ValueError`` with one clear, n8n-style message."""
    if not isinstance(raw, dict):
        raise ValueError(f"Invalid task settings: expected an object, got {type(raw).__name__}")
    try:
        return TaskSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        if first["type"] == "missing":
            raise ValueError(f"Missing field in task settings message: '{field}'") from None
        if field == "nodeMode":
            raise ValueError(str(first["ctx"].get("error", first["msg"]))) from None
        raise ValueError(f"Invalid task settings: {field}: {first['msg']}") from None
