"""runner.testing's client of a broker's HTTP API: submit a task and wait for its document,
failing fast when no runner is connected; the error every helper raises."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import httpx


class SandboxServiceError(RuntimeError):
    """The service in the container did not start, or a task could not be run through it
    (refused, no runner connected to the broker, not finished in time)."""


# run_task gives up this long after submission when the broker has had no runner all the
# time (a runner that connects meanwhile starts the count again): a broker nobody serves
# would otherwise hold the caller for the whole timeout and say nothing.
NO_RUNNER_GRACE_S = 3.0
# Long-poll lengths: short while nobody could take the task, so the grace is noticed.
SHORT_WAIT_S = 1.0
LONG_WAIT_S = 30.0
NO_RUNNER_HELP = (
    "Add one: SandboxRunnerContainer(broker) next to an EmbeddedBrokerContainer, or "
    "SandboxContainer() instead (the broker and a runner in one container); outside "
    "testcontainers, `sandbox-runner serve` with N8N_RUNNERS_TASK_BROKER_URI set to the "
    "broker's URL and N8N_RUNNERS_AUTH_TOKEN to its auth token."
)
Mode = Literal["all_items", "per_item", "runOnceForAllItems", "runOnceForEachItem"]


def submit_task(
    api_url: str,
    api_key: str | None,
    code: str,
    *,
    items: list[Any] | None = None,
    mode: Mode = "all_items",
    timeout_s: float = 120.0,
    no_runner_grace_s: float = NO_RUNNER_GRACE_S,
    **options: Any,
) -> dict[str, Any]:
    """``POST /v1/tasks`` on a broker's API and wait (polling) for the task's document.

    Fails fast when nobody can run it: once the broker has had no runner connected for
    ``no_runner_grace_s`` (counted from submission; a runner that connects meanwhile
    starts the count again), the task is cancelled and :class:`SandboxServiceError`
    says that no runner is connected and how to add one. A task not finished within
    ``timeout_s`` is cancelled too, and the error says what it was waiting for.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"code": code, "items": items or [], "mode": mode, **options}
    submitted = time.monotonic()
    deadline = submitted + timeout_s
    last_runner_seen = submitted
    with httpx.Client(base_url=api_url, headers=headers, timeout=LONG_WAIT_S + 10) as client:
        # A short first wait: with no runner, a long one would hide it.
        response = client.post(
            "/v1/tasks", params={"wait": min(SHORT_WAIT_S, timeout_s)}, json=body
        )
        if response.status_code not in (200, 202):
            raise SandboxServiceError(f"submit failed: {response.status_code} {response.text}")
        while response.status_code == 202:
            state: dict[str, Any] = response.json()
            now = time.monotonic()
            no_runner = _waits_for_a_runner(state)
            if not no_runner:
                last_runner_seen = now
            elif now - last_runner_seen >= no_runner_grace_s:
                _cancel(client, state["taskId"])
                raise SandboxServiceError(
                    f"No runner is connected to this broker ({api_url}): the task waited "
                    f"{now - submitted:.1f}s and was cancelled. {NO_RUNNER_HELP}"
                )
            if now >= deadline:
                _cancel(client, state["taskId"])
                raise SandboxServiceError(
                    f"task did not finish within {timeout_s:.0f}s and was cancelled "
                    f"(it was {_describe(state)})"
                )
            wait = min(SHORT_WAIT_S if no_runner else LONG_WAIT_S, deadline - now)
            response = client.get(f"/v1/tasks/{state['taskId']}", params={"wait": wait})
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def _waits_for_a_runner(state: dict[str, Any]) -> bool:
    """Whether a task state from the API says no runner is connected (``waitReason``)."""
    reason = state.get("waitReason")
    return isinstance(reason, dict) and reason.get("code") == "no_runner"


def _describe(state: dict[str, Any]) -> str:
    reason = state.get("waitReason")
    if isinstance(reason, dict) and reason.get("message"):
        return f"{state.get('status')}: {reason['message']}"
    return str(state.get("status"))


def _cancel(client: httpx.Client, task_id: str) -> None:
    # Nothing is left queued behind an error we raise (best effort: the broker may be gone).
    with contextlib.suppress(httpx.HTTPError):
        client.delete(f"/v1/tasks/{task_id}", timeout=10)
