"""Runner and infrastructure faults: one tree, one stable ``code`` per class.

Task outcomes (a user exception, a timeout, an OOM kill, an analyzer rejection...)
are *values* (see :mod:`runner.sandbox.base`), never exceptions. The classes here
are for faults of the runner itself and of what it depends on::

    RunnerError                      code
    ├── ConfigurationError           configuration_error   bad settings or policy files
    ├── InfrastructureError          infrastructure_error  something we depend on failed
    │   ├── DockerUnavailableError   docker_unavailable    daemon unreachable / 5xx after retries
    │   ├── ImageBuildError          image_build_failed    task image could not be built
    │   ├── ContainerSetupError      container_setup_failed create/attach/start failed after retries
    │   └── IsolationNotEnforcedError isolation_not_enforced the self-check found a required
    │                                                      guarantee of the policy not in force
    └── AgentProtocolError           agent_protocol_error  the agent's output broke the framing
                                                           (it is untrusted input)

Third-party exceptions are translated once, at the adapter edge
(:mod:`runner.sandbox.docker`), with ``raise ... from exc``.
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


class AgentProtocolError(RunnerError):
    """The in-container agent produced output that breaks the result framing."""

    code = "agent_protocol_error"
