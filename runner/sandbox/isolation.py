"""What every task container is isolated by, whatever runs it, and the host probes it needs.

Owns: :class:`IsolationConfig` (the seccomp profile, the AppArmor profile where the host
has AppArmor, the non-root user, no-new-privileges, the policy's hash), built once from
the effective policy and fixed for the life of a sandbox; its description for the audit
record; and :func:`host_has_apparmor`, the one host fact it depends on.

Backend-neutral: the Docker and OCI renderings of a container live with their
backends (:mod:`runner.sandbox.spec` derives one container spec from this and the
limits). Must not import docker, asyncio or a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.policy import EffectivePolicy

SANDBOX_USER = "10001:10001"
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")


def host_has_apparmor() -> bool:
    """Does this host's kernel have AppArmor enabled (so a profile can confine a task)?"""
    try:
        return APPARMOR_ENABLED.read_text().strip() == "Y"
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """What every task container gets, fixed for the life of the sandbox.

    Built from the policy bundle (:meth:`from_policy`); every field is hashable (the
    warm pool keys its slots on this object).
    """

    seccomp_profile: Path
    seccomp_json: str
    seccomp_sha256: str
    apparmor_profile: str | None
    user: str = SANDBOX_USER
    policy_sha256: str | None = None
    # Required by the policy linter, and by our seccomp profile itself: without it
    # runc installs the filter before dropping privileges and container start fails.
    no_new_privileges: bool = True

    @classmethod
    def from_policy(
        cls, policy: EffectivePolicy, *, apparmor_available: bool | None = None
    ) -> IsolationConfig:
        """The bundle's seccomp profile, uid and AppArmor profile (when the host has it)."""
        bundle = policy.bundle
        if apparmor_available is None:
            apparmor_available = host_has_apparmor()
        return cls(
            seccomp_profile=bundle.seccomp_path,
            seccomp_json=bundle.seccomp_json,
            seccomp_sha256=bundle.seccomp_sha256,
            apparmor_profile=policy.apparmor_profile if apparmor_available else None,
            user=policy.user,
            policy_sha256=bundle.sha256,
            no_new_privileges=bundle.config.container.no_new_privileges,
        )

    @property
    def uid_gid(self) -> tuple[int, int]:
        """The task user as numbers (``user`` is ``uid:gid``, or a uid alone)."""
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)

    def security_opt(self) -> list[str]:
        """Docker's ``--security-opt`` values for this isolation."""
        opts = [f"seccomp={self.seccomp_json}"]
        if self.no_new_privileges:
            opts.insert(0, "no-new-privileges:true")
        if self.apparmor_profile:
            opts.append(f"apparmor={self.apparmor_profile}")
        return opts

    def report(self, guarantees: dict[str, Any] | None = None) -> dict[str, Any]:
        """The isolation of every task, for the audit record.

        ``guarantees`` is what the self-check proved in force (per guarantee: pass,
        fail or not-available); without one the record says so rather than claim it.
        """
        return {
            "policySha256": self.policy_sha256,
            "network": "none",
            "readOnlyRootfs": True,
            "capabilities": "all dropped",
            "noNewPrivileges": self.no_new_privileges,
            "seccomp": {"profile": str(self.seccomp_profile), "sha256": self.seccomp_sha256},
            "apparmor": self.apparmor_profile or "unavailable (host kernel has no AppArmor)",
            "user": self.user,
            "init": "tini (from the image)",
            "ipc": "none",
            "cgroupns": "private",
            "environment": "empty (image defaults only)",
            "mounts": "tmpfs /tmp only",
            "guarantees": guarantees
            if guarantees is not None
            else "not verified (no self-check ran for this pipeline)",
        }
