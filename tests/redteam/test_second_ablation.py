"""A second ablation: prove that the one layer named for a probe is what holds it.

The catalog's ablation swaps our seccomp profile for Docker's default and says, per
probe, which layers still stop it (its ``layers`` line). For a probe held by one
layer only, that claim is proved by removing that layer too and watching the attack
go through. This is possible without touching the runner where the layer is a
field of ``IsolationConfig``: here the seccomp profile itself, whose JSON goes to
Docker as ``seccomp=<json>``, so ``unconfined`` removes it.

The two probes held only by ``docker-seccomp`` that create user namespaces run with
guards off and no seccomp profile at all; every other layer stays (all capabilities
dropped, no-new-privileges, network none, read-only root, uid 10001). The user
namespace is then created: the seccomp profile (ours or Docker's) was the one
layer. What needs a capability in the host's user namespace (a mount or network
namespace on its own) stays refused by the capabilities, as the probes' notes say.

Not provable this way: the probes held only by ``network`` (abstract_socket_peer,
docker_api_tcp, network_egress), ``pidns``, ``ipcns`` or ``config``. The sandbox
sets ``network_mode``, ``ipc_mode`` and the PID namespace itself, not from
``IsolationConfig``, so a second ablation of those layers would need a change in
``runner/`` (docs/security.md says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import pytest
from integration.conftest import pipeline_factory

from runner.pipeline import TaskRequest
from runner.settings import Settings

from .catalog import detect_host_facts, load_catalog
from .harness import docker_default_isolation

pytestmark = pytest.mark.timeout(300)

FACTS = detect_host_facts()
BY_NAME = {probe.name: probe for probe in load_catalog(FACTS)}
UNCONFINED = "unconfined"

# With no seccomp profile, on a kernel that allows unprivileged user namespaces: a
# user namespace (and a mount namespace inside it, where the task holds every
# capability) is created; a network namespace on its own needs CAP_SYS_ADMIN in the
# host's user namespace, which the task does not have (EPERM). PID 1's namespace
# files cannot be opened (tini is execute-only, so not dumpable: no ptrace-read
# access), so the probe's setns gets no descriptor (EBADF). clone3 with no argument
# structure is EINVAL (size 0), from the kernel.
WITHOUT_SECCOMP: dict[str, dict[str, Any]] = {
    "unshare_namespaces": {"user": "ok", "user+mount": "ok", "net": "EPERM", "setns": "EBADF"},
    "clone_namespace_flags": {"clone_newuser": "ok", "clone_newns": "EPERM", "clone3": "EINVAL"},
}


def not_provable_here() -> None:
    """Where the kernel allows no unprivileged user namespace, it holds these probes too
    (their layers lines say so for userns=no): removing seccomp cannot show it was the
    one layer. Said as a skip with its reason, never a pass."""
    if FACTS["userns"] != "yes":
        pytest.skip(
            "second ablation not possible on this host: it allows no unprivileged user "
            "namespaces (/proc/sys/user/max_user_namespaces is 0), so the kernel holds "
            "unshare_namespaces and clone_namespace_flags as well as seccomp"
        )


def test_the_probes_proved_here_are_held_by_docker_seccomp_alone() -> None:
    not_provable_here()
    for name in WITHOUT_SECCOMP:
        probe = BY_NAME[name]
        assert probe.layers == ("docker-seccomp",), (name, probe.layers)
        # Under Docker's profile the attack is refused: what changes below is only that.
        ablation = probe.expects["ablation"]
        assert ablation.outcome == "success", name
        assert set(ablation.result) == set(WITHOUT_SECCOMP[name]), name
        assert ablation.result != WITHOUT_SECCOMP[name], name


def test_without_any_seccomp_profile_the_user_namespace_is_created(
    base_settings: Settings, task_image: str
) -> None:
    not_provable_here()
    isolation = dataclasses.replace(
        docker_default_isolation(base_settings),
        seccomp_json=UNCONFINED,
        seccomp_sha256=hashlib.sha256(UNCONFINED.encode()).hexdigest(),
    )
    assert isolation.security_opt() == ["no-new-privileges:true", "seccomp=unconfined"]

    async def run_all() -> dict[str, Any]:
        factory = pipeline_factory(base_settings, task_image)
        seen: dict[str, Any] = {}
        async with factory(guards_off=True, isolation=isolation) as pipeline:
            for name in WITHOUT_SECCOMP:
                report = await pipeline.run(TaskRequest(code=BY_NAME[name].code))
                seen[name] = (
                    report.result
                    if report.error is None
                    else (report.outcome.value, report.error.message)
                )
        return seen

    assert asyncio.run(run_all()) == WITHOUT_SECCOMP
