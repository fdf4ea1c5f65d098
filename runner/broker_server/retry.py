"""A task's retry policy (opt-in): which failures are tried again, when, and what is
kept of each failed attempt.

Owns: the fixed allowlist of retryable error codes (:data:`RETRYABLE_CODES`), the
policy a caller opts in to (:class:`RetryPolicy`: ``maxAttempts``, ``initialDelayS``,
``backoffMultiplier``, ``retryOn``), its bounds and the refusal of a code outside the
allowlist (:func:`retry_on_problem`) or of a back-off longer than the queue timeout
(:func:`backoff_problem`), the policy as the HTTP API spells it
(:class:`RetryRequest`, camelCase as the API's other fields), the back-off before each retry
(:meth:`RetryPolicy.delay_s`) and what is left of it after a broker restart
(:func:`backoff_left_s`), and what is kept of a failed attempt (:class:`AttemptError`:
its error, capped, and when it failed).

**Only infrastructure outcomes are retried, never the task's own.** A retry runs the
same code on the same data again: when the code failed (an exception, a timeout, an
OOM kill, a security violation, a crash, a result that broke the schema) it fails
again, at the tenant's cost and the runners'. What is retried is an attempt that
never got a fair run: its runner left and never came back (``runner_lost``), or the
runner could not make or start its container (``container_setup_failed``,
``docker_unavailable``, ``image_build_failed``, ``infrastructure_error``,
``isolation_not_enforced``: another runner, or the same one a moment later, may
succeed). Left out on purpose: ``queue_timeout`` (the queue timeout already is how
long a task may wait for a runner), ``dispatch_failed`` and ``invalid_report`` (a bug
or a runner that breaks the protocol: the same again), ``configuration_error``,
``profile_unavailable``, ``limit_above_ceiling`` (a mismatch no retry fixes),
``runner_error``/``internal_error``/``task_error`` (a runner's bug, or n8n's runner,
which reports a user's error with no code: it may be the task's own), ``cancelled``
(the caller's word), and every failure outcome of the task itself. The core checks
the allowlist again on each failure, so a policy that names another code (one
built in code, or read from a store) still never retries it.

Data and rules only, no clock and no I/O: the core (:mod:`runner.broker_server.core`)
arms the back-off as one of its deadlines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.sandbox.base import ErrorCode

RETRYABLE_CODES: frozenset[str] = frozenset(
    code.value
    for code in (
        ErrorCode.RUNNER_LOST,
        ErrorCode.CONTAINER_SETUP_FAILED,
        ErrorCode.DOCKER_UNAVAILABLE,
        ErrorCode.IMAGE_BUILD_FAILED,
        ErrorCode.INFRASTRUCTURE_ERROR,
        ErrorCode.ISOLATION_NOT_ENFORCED,
    )
)

# Bounds of a policy (the API refuses anything outside them with a 422). The defaults
# of a `retry` object that leaves a field out are n8n's "Retry On Fail" (3 tries, 1 s).
MAX_ATTEMPTS = 10
MAX_INITIAL_DELAY_S = 300.0
MAX_BACKOFF_MULTIPLIER = 10.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_DELAY_S = 1.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0

# What is kept of each failed attempt's error (at most maxAttempts of them per task):
# a runner's message and description are untrusted and may be long.
MAX_MESSAGE_CHARS = 500
MAX_DESCRIPTION_CHARS = 2000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts``: attempts the policy makes at most (the first and
    ``max_attempts - 1`` retries; a re-run after a broker restart is recovery, not a
    retry, and does not count); ``delay_s``: the back-off before each retry."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_delay_s: float = DEFAULT_INITIAL_DELAY_S
    backoff_multiplier: float = DEFAULT_BACKOFF_MULTIPLIER
    retry_on: frozenset[str] = RETRYABLE_CODES

    def retries(self, code: str) -> bool:
        """Whether a failure with ``code`` is one this policy tries again: named by it
        *and* in the allowlist (a task's own failure never is, whatever it names)."""
        return code in self.retry_on and code in RETRYABLE_CODES

    def delay_s(self, failures: int) -> float:
        """The back-off before the attempt that follows ``failures`` failed ones (>= 1):
        ``initialDelayS * backoffMultiplier ** (failures - 1)``. No jitter: a retry goes
        back to the broker's queue, which paces it by free runner slots."""
        return float(self.initial_delay_s * self.backoff_multiplier ** max(0, failures - 1))

    def total_delay_s(self) -> float:
        """The back-off of every retry the policy may make, added up."""
        return sum(self.delay_s(failures) for failures in range(1, self.max_attempts))

    def as_json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialDelayS": self.initial_delay_s,
            "backoffMultiplier": self.backoff_multiplier,
            "retryOn": sorted(self.retry_on),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RetryPolicy:
        return cls(
            max_attempts=int(value["maxAttempts"]),
            initial_delay_s=float(value["initialDelayS"]),
            backoff_multiplier=float(value["backoffMultiplier"]),
            retry_on=frozenset(value["retryOn"]),
        )


def retry_on_problem(codes: list[str]) -> str | None:
    """Why ``retryOn`` cannot be taken (None: it can): it may name only retryable
    infrastructure outcomes, at least one of them."""
    if not codes:
        return "retryOn must name at least one code (or be left out: every retryable one)"
    refused = sorted({code for code in codes if code not in RETRYABLE_CODES})
    if not refused:
        return None
    return (
        f"retryOn may name only infrastructure outcomes ({', '.join(sorted(RETRYABLE_CODES))}); "
        f"not {', '.join(refused)}: a task's own failure is never retried (it would fail again)"
    )


class QueueTimeout(Protocol):
    @property
    def queue_timeout_s(self) -> float: ...


def backoff_problem(policy: RetryPolicy, config: QueueTimeout) -> str | None:
    """Why ``policy``'s back-off is too long for this broker (None: it is not). A task
    may wait on purpose no longer than any task may wait for a runner: every retry's
    back-off added up is at most the broker's queue timeout."""
    total_s, limit_s = policy.total_delay_s(), config.queue_timeout_s
    if total_s <= limit_s:
        return None
    return (
        f"retry: the back-off of every retry adds up to {total_s:g} s, more than this "
        f"broker's queue timeout of {limit_s:g} s (SANDBOX_QUEUE_TIMEOUT_S); ask for fewer "
        "attempts, a shorter initialDelayS or a smaller backoffMultiplier"
    )


class RetryRequest(BaseModel):
    """A task's retry policy (opt-in; without one a task has one attempt, as n8n's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Bounds: runner.broker_server.retry (the total back-off is checked against the
    # broker's queue timeout at submission).
    max_attempts: int = Field(
        DEFAULT_MAX_ATTEMPTS,
        ge=1,
        le=MAX_ATTEMPTS,
        alias="maxAttempts",
        description="Attempts at most, the first included.",
    )
    initial_delay_s: float = Field(
        DEFAULT_INITIAL_DELAY_S,
        ge=0,
        le=MAX_INITIAL_DELAY_S,
        alias="initialDelayS",
        description="Seconds before the first retry.",
    )
    backoff_multiplier: float = Field(
        DEFAULT_BACKOFF_MULTIPLIER,
        ge=1,
        le=MAX_BACKOFF_MULTIPLIER,
        alias="backoffMultiplier",
        description="Each retry's delay is the previous one's times this.",
    )
    retry_on: list[str] | None = Field(
        None,
        alias="retryOn",
        max_length=len(RETRYABLE_CODES),
        description="Error codes to retry (default: all of them): "
        + ", ".join(sorted(RETRYABLE_CODES))
        + ". A task's own failure (user_error, timeout, ...) is never retried.",
    )

    @field_validator("retry_on")
    @classmethod
    def _only_infrastructure(cls, codes: list[str] | None) -> list[str] | None:
        if codes is not None and (problem := retry_on_problem(codes)) is not None:
            raise ValueError(problem)
        return codes

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_delay_s=self.initial_delay_s,
            backoff_multiplier=self.backoff_multiplier,
            retry_on=RETRYABLE_CODES if self.retry_on is None else frozenset(self.retry_on),
        )


@dataclass(frozen=True, slots=True)
class AttemptError:
    """What is kept of one failed attempt: its number, when it failed (wall clock, for
    people and for a back-off across a restart) and its error, capped."""

    attempt: int
    failed_at: datetime
    code: str
    stage: str
    message: str
    description: str

    @classmethod
    def of(cls, attempt: int, error: dict[str, Any], failed_at: datetime) -> AttemptError:
        """From a result document's ``error`` object (its texts capped; the time to the
        millisecond, as it is shown and stored)."""
        return cls(
            attempt=attempt,
            failed_at=failed_at.replace(microsecond=failed_at.microsecond // 1000 * 1000),
            code=str(error.get("code", "")),
            stage=str(error.get("stage", "")),
            message=str(error.get("message", ""))[:MAX_MESSAGE_CHARS],
            description=str(error.get("description", ""))[:MAX_DESCRIPTION_CHARS],
        )

    def as_json(self) -> dict[str, Any]:
        """As the API shows it (an entry of ``attempts``)."""
        return {
            "attempt": self.attempt,
            "failedAt": self.failed_at.isoformat(timespec="milliseconds"),
            "error": {
                "message": self.message,
                "description": self.description,
                "code": self.code,
                "stage": self.stage,
            },
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> AttemptError:
        return cls.of(
            int(value["attempt"]), value["error"], datetime.fromisoformat(value["failedAt"])
        )


def attempts_to_text(attempts: tuple[AttemptError, ...] | list[AttemptError]) -> str | None:
    """The attempts as JSON text for a store (None for none)."""
    if not attempts:
        return None
    return json.dumps([attempt.as_json() for attempt in attempts], separators=(",", ":"))


def attempts_of_text(text: str | None) -> tuple[AttemptError, ...]:
    return () if not text else tuple(AttemptError.from_json(item) for item in json.loads(text))


def backoff_left_s(
    policy: RetryPolicy | None,
    attempts: tuple[AttemptError, ...] | list[AttemptError],
    now: datetime,
) -> float:
    """What is left of the back-off of a task recovered after a restart (0: none).

    The monotonic clock does not survive a restart, so this counts from the wall clock
    of the last failure; clamped to the back-off itself, so that a clock set back
    cannot make a task wait longer than its policy says.
    """
    if policy is None or not attempts or len(attempts) >= policy.max_attempts:
        return 0.0
    delay = policy.delay_s(len(attempts))
    elapsed = (now - attempts[-1].failed_at).total_seconds()
    return min(delay, max(0.0, delay - elapsed))
