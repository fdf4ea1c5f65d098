"""Docker's faults, mapped once: the only place that knows docker's and requests'
exception classes.

Owns: :data:`DOCKER_FAULTS` (what a Docker call may raise: the SDK's exceptions and
its HTTP transport's), :func:`docker_errors` (the context manager every Docker call
of the runner goes through, translating those into :mod:`runner.errors` with
``raise ... from exc``, as httpx maps its transport's exceptions at the edge), and
the classification of set-up failures for tenacity (:func:`is_transient`) and for
the retry metrics (:func:`retry_cause`). Deliberate swallowing elsewhere is spelled
``contextlib.suppress(*DOCKER_FAULTS)``, so it is visible as such.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import docker.errors
import requests.exceptions

from runner.errors import (
    ContainerSetupError,
    DockerUnavailableError,
    InfrastructureError,
    RunnerError,
)

DOCKER_FAULTS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
)


def translate(exc: BaseException, what: str) -> InfrastructureError:
    """Docker/requests exceptions -> our tree: a 5xx or an unreachable daemon is
    :class:`DockerUnavailableError`, a refusal (4xx) :class:`ContainerSetupError`."""
    if isinstance(exc, InfrastructureError):
        return exc
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        detail = exc.explanation or str(exc)
        if status >= 500:
            return DockerUnavailableError(f"Docker daemon failed to {what}", hint=str(detail))
        return ContainerSetupError(f"Docker refused to {what}", hint=str(detail))
    return DockerUnavailableError(
        f"Docker daemon unreachable while trying to {what}", hint=str(exc) or type(exc).__name__
    )


@contextlib.contextmanager
def docker_errors(what: str, *, into: type[RunnerError] | None = None) -> Iterator[None]:
    """Translate what a Docker call in the block raises, once, at the edge.

    ``what`` names the operation ("create the task container"): by default the fault
    becomes :func:`translate`'s error for it; with ``into``, ``what`` is the whole
    message of an ``into`` error (``ImageBuildError("Cannot inspect images")``) and the
    Docker fault its hint. Our own errors pass through untouched.
    """
    try:
        yield
    except RunnerError:
        raise
    except DOCKER_FAULTS as exc:
        if into is not None:
            raise into(what, hint=str(exc) or type(exc).__name__) from exc
        raise translate(exc, what) from exc


def is_transient(exc: BaseException) -> bool:
    """Set-up failures worth another attempt: daemon unreachable, 5xx, 409, timeouts."""
    if isinstance(exc, docker.errors.ImageNotFound):
        return True  # the image is (re)built once, then the set-up is retried
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        return status >= 500 or status == 409
    return isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | docker.errors.DockerException
        | ConnectionError
        | TimeoutError,
    )


def retry_cause(exc: BaseException | None) -> str:
    """A retried set-up failure as a metrics label (``sandbox_runner_retries_total``)."""
    if isinstance(exc, docker.errors.ImageNotFound):
        return "image_missing"
    if isinstance(exc, docker.errors.APIError):
        return "conflict" if exc.status_code == 409 else "daemon_error"
    if isinstance(exc, requests.exceptions.Timeout | TimeoutError):
        return "timeout"
    return "daemon_unreachable"
