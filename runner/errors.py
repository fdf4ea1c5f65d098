"""Every exception of the runner: faults in one tree, one stable ``code`` per class,
and the refusals of requests beside it.

Task outcomes (a user exception, a timeout, an OOM kill, an analyzer rejection...)
are *values* (see :mod:`runner.sandbox.base`), never exceptions. The classes here
are for faults of the runner itself and of what it depends on::

    RunnerError                      code
    ├── ConfigurationError           configuration_error   bad settings or policy files
    │   └── BrokerAuthError          broker_auth_failed    the broker refused our credentials
    │                                                      (401/403): retrying cannot help
    ├── InfrastructureError          infrastructure_error  something we depend on failed
    │   ├── DockerUnavailableError   docker_unavailable    daemon unreachable / 5xx after retries
    │   ├── ImageBuildError          image_build_failed    task image could not be built
    │   ├── ContainerSetupError      container_setup_failed create/attach/start failed after retries
    │   ├── IsolationNotEnforcedError isolation_not_enforced the self-check found a required
    │   │                                                  guarantee of the policy not in force
    │   └── BrokerUnavailable        broker_unavailable    the broker cannot be reached (retried)
    ├── AgentProtocolError           agent_protocol_error  the agent's output broke the framing
    │                                                      (it is untrusted input)
    └── ProtocolError                protocol_error        a frame that is not a valid message of
        │                                                  n8n's task-runner protocol
        └── UnknownMessageType       unknown_message_type  a valid frame of a type we do not
                                                           handle (logged and ignored)

and the refusals: a request that cannot be taken as it is. Not faults (nothing failed;
the caller may change the request), so not under :class:`RunnerError`, and no code:
the HTTP API answers each with a status, the runner with the task's error::

    RequestRefused
    ├── LimitAboveCeiling            a per-task limit asked for above the runner's (or the
    │                                broker's) own, or below its floor; also a ValueError
    ├── ProfileUnavailable           a tenant whose profile asks for what this runner does
    │                                not have (a runtime tier, an image variant)
    ├── SubmissionRefused            a submission that cannot travel (HTTP 422); also a ValueError
    ├── TaskTooLarge                 one task larger than its tenant's byte budget (HTTP 413)
    ├── TenantBacklogFull            a tenant with too many unfinished tasks or bytes (HTTP 429)
    └── IdempotencyKeyReused         an Idempotency-Key sent again with another request body
                                     (HTTP 422)

Third-party exceptions are translated once, at the adapter edge, with
``raise ... from exc``: Docker's by :mod:`runner.sandbox.docker_errors`, httpx's and
websockets' by :mod:`runner.broker`. An adapter may keep an exception of its own that
never leaves it: the OCI runtime's failed command
(:class:`runner.sandbox.oci.runtime.RuntimeFailure`, which
:mod:`runner.sandbox.oci.sandbox` turns into :class:`ContainerSetupError` at its edge,
as a Docker fault is turned into one of these) and the schema metering's budget
(``runner.broker_server.schemas._OverBudget``, control flow inside one call). The test
helpers' :class:`runner.testing.SandboxServiceError` is raised in a user's test process,
by the client, never by the runner.

Must not import anything of the runner: every module may import this one.
"""

from __future__ import annotations


class RunnerError(Exception):
    """Root of every fault the runner raises on purpose."""

    code = "runner_error"
    # Where in a task's pipeline the fault struck (``setup`` unless said otherwise): a
    # daemon lost while the task's code ran is a ``run`` fault, not a set-up one.
    stage = "setup"

    def __init__(self, message: str, *, hint: str | None = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if stage is not None:
            self.stage = stage

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class ConfigurationError(RunnerError):
    """A setting, an environment variable or a policy file is invalid."""

    code = "configuration_error"


class BrokerAuthError(ConfigurationError):
    """The broker refused our credentials (401/403): retrying cannot help."""

    code = "broker_auth_failed"


class InfrastructureError(RunnerError):
    """Something the runner depends on (Docker, the image) failed."""

    code = "infrastructure_error"


class DockerUnavailableError(InfrastructureError):
    """The Docker daemon cannot be reached, or keeps failing."""

    code = "docker_unavailable"


class ImageBuildError(InfrastructureError):
    """The task image could not be built or found."""

    code = "image_build_failed"


class ContainerSetupError(InfrastructureError):
    """A task container could not be created, attached or started."""

    code = "container_setup_failed"


class IsolationNotEnforcedError(InfrastructureError):
    """The self-check's canary container lacks a guarantee the policy requires.

    The runner refuses to take tasks: the host (kernel, daemon, runtime) does not
    enforce what the policy bundle promises.
    """

    code = "isolation_not_enforced"


class BrokerUnavailable(InfrastructureError):
    """The broker cannot be reached right now (retried)."""

    code = "broker_unavailable"


class AgentProtocolError(RunnerError):
    """The in-container agent produced output that breaks the result framing."""

    code = "agent_protocol_error"


class ProtocolError(RunnerError):
    """A frame that is not a valid message of the protocol."""

    code = "protocol_error"


class UnknownMessageType(ProtocolError):
    """A well-formed frame whose ``type`` we do not handle (logged and ignored)."""

    code = "unknown_message_type"


# -- refusals -----------------------------------------------------------------------------


class RequestRefused(Exception):
    """A request that cannot be taken as it is; the message says why (for the caller)."""


class LimitAboveCeiling(RequestRefused, ValueError):
    """A per-task limit asked for is above the runner's own (or the broker's ceiling),
    or below its floor (a limit that rounds to nothing would be no limit at all)."""


class ProfileUnavailable(RequestRefused):
    """A task of a tenant whose profile this runner cannot honour (the runtime tier or
    the image variant it asks for): refused, never run under less than its profile."""


class SubmissionRefused(RequestRefused, ValueError):
    """A submission the broker cannot take as it is (a 422: the message says why)."""


class TaskTooLarge(RequestRefused):
    """One task alone needs more than its tenant's queued-bytes budget (a 413)."""


class TenantBacklogFull(RequestRefused):
    """A tenant already has ``max_unfinished_per_tenant`` tasks that have not finished,
    or their bytes would exceed its queued-bytes budget (both a 429: wait and retry)."""


class IdempotencyKeyReused(RequestRefused):
    """A tenant sent an ``Idempotency-Key`` it already used, with a different request:
    the key names the first request's task, so the second cannot be taken (a 422)."""
