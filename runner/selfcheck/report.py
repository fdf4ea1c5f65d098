"""What a self-check proved: each guarantee's status, and the report the runner,
health and every audit record show."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a status, not a password
    FAIL = "fail"
    NOT_AVAILABLE = "not-available"


@dataclass(frozen=True, slots=True)
class GuaranteeResult:
    name: str
    status: Status
    required: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "required": self.required,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class SelfCheckReport:
    """What the canaries proved, under which policy, on which daemon."""

    policy_sha256: str
    daemon_id: str
    results: tuple[GuaranteeResult, ...]
    checked_at: str  # wall clock, ISO 8601 UTC
    duration_ms: float
    key: str = ""
    cached: bool = False

    @property
    def is_ok(self) -> bool:
        """Every required guarantee holds."""
        return not self.missing_required

    @property
    def missing_required(self) -> list[GuaranteeResult]:
        return [r for r in self.results if r.required and r.status is not Status.PASS]

    @property
    def missing_optional(self) -> list[GuaranteeResult]:
        return [r for r in self.results if not r.required and r.status is not Status.PASS]

    def in_force(self) -> dict[str, str]:
        """Guarantee -> pass / fail / not-available (for audit records and health)."""
        return {r.name: r.status.value for r in self.results}

    def audit(self) -> dict[str, Any]:
        """The ``guarantees`` part of every task's audit record."""
        return {
            "policySha256": self.policy_sha256,
            "checkedAt": self.checked_at,
            "daemonId": self.daemon_id,
            "cached": self.cached,
            "inForce": self.in_force(),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.is_ok,
            "policySha256": self.policy_sha256,
            "daemonId": self.daemon_id,
            "checkedAt": self.checked_at,
            "durationMs": round(self.duration_ms, 1),
            "cached": self.cached,
            "key": self.key,
            "guarantees": [r.as_json() for r in self.results],
        }

    def failure_message(self) -> str:
        missing = ", ".join(f"{r.name} ({r.detail})" for r in self.missing_required)
        return f"Required isolation guarantees are not in force: {missing}"
