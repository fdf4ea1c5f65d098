"""testcontainers for sandbox-runner: a real sandbox service in your pytest, in one line.

::

    from runner.testing import SandboxContainer

    with SandboxContainer() as sandbox:
        document = sandbox.run_task("return [{'json': {'n': len(_items)}}]", items=[{"a": 1}])
        assert document["result"] == [{"json": {"n": 1}}]

- :class:`SandboxContainer`: the runner image running ``sandbox-runner up``, the
  embedded broker and one runner in one container. The simple case.

For wiring runners to a broker, the pair:

- :class:`EmbeddedBrokerContainer`: the runner image running ``sandbox-runner broker``
  (the HTTP API and the runner endpoint on one port), on a network of its own. It
  runs no task by itself: give it a runner.
- :class:`SandboxRunnerContainer`: the runner image running ``sandbox-runner serve``,
  wired to a broker (an :class:`EmbeddedBrokerContainer` or a :class:`SandboxContainer`,
  or any broker by URI and auth token).

The containers that run tasks (:class:`SandboxContainer`, :class:`SandboxRunnerContainer`)
reach the Docker API through the mounted socket (or ``DOCKER_HOST``); the task
containers they create are their siblings on the host's daemon and never get the socket.

All are context managers that wait until the service is ready (the broker answers; a
runner is connected to its broker), and all have ``run_task(code, items=None,
mode="all_items")``, which returns the document ``sandbox-runner exec`` prints, and
``metrics()`` (Prometheus text). ``run_task`` fails fast, with
:class:`SandboxServiceError` saying so, when the broker has no runner connected for
:data:`NO_RUNNER_GRACE_S` (it cancels the task first).

Clean-up does not depend on Ryuk (set ``TESTCONTAINERS_RYUK_DISABLED=true`` where
its image cannot be pulled): on exit the service is stopped with SIGTERM (a runner
drains and removes its warm pool), then every container still labelled with its
runner id (``io.sandbox-runner.owner``) is removed, and the network. Containers of a
test process that died are reaped when the next one starts (labels
``io.sandbox-runner.testing.*`` name the process).

The image: ``image=...``, else ``SANDBOX_RUNNER_IMAGE``, else the one built from
this source checkout (``make image``; built here when missing, cached by input hash).

Needs the ``testing`` extra (``pip install 'sandbox-runner[testing]'``).
"""

from __future__ import annotations

from runner.testing.client import SandboxServiceError, submit_task
from runner.testing.containers import (
    EmbeddedBrokerContainer,
    SandboxContainer,
    SandboxRunnerContainer,
)
from runner.testing.processes import BrokerProcess, RedisServer, ServeProcess, UpProcess
from runner.testing.session import (
    LABEL_TESTING,
    LABEL_TESTING_NAMESPACE,
    LABEL_TESTING_PROCESS,
    LABEL_TESTING_RUNNER,
    docker_socket,
    reap_leftovers,
    remove_owned,
    runner_image,
    session_labels,
)

__all__ = [
    "LABEL_TESTING",
    "LABEL_TESTING_NAMESPACE",
    "LABEL_TESTING_PROCESS",
    "LABEL_TESTING_RUNNER",
    "BrokerProcess",
    "EmbeddedBrokerContainer",
    "RedisServer",
    "SandboxContainer",
    "SandboxRunnerContainer",
    "SandboxServiceError",
    "ServeProcess",
    "UpProcess",
    "docker_socket",
    "reap_leftovers",
    "remove_owned",
    "runner_image",
    "session_labels",
    "submit_task",
]
