"""A tenant's profile, resolved for the pipeline from the runner's own policy bundle.

Owns: turning each ``tenants/<name>.toml`` of the runner's bundle (as
:class:`~runner.policy.EffectivePolicy` holds it) into the
:class:`~runner.pipeline.TaskProfile` its tasks run under: limits, analyzer, guards,
the per-task limits it may ask for, the image variant its tasks run on, and why this
runner cannot run them at all (a runtime tier or an image variant it lacks). What a
broker sends is only the tenant's name; everything else comes from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from runner.analyzer import Analyzer
from runner.pipeline import ImageVariantSandbox, TaskProfile
from runner.policy import EffectivePolicy
from runner.sandbox.base import Limits

# [limits] key -> the name of the per-task limit a broker may ask for (the wire's).
_REQUESTABLE = {"timeout_s": "timeoutSeconds", "memory_mb": "memoryMb", "cpus": "cpus"}


def tenant_profiles(
    policy: EffectivePolicy,
    analyzer: Analyzer,
    limits: Limits,
    runtime_tier: str,
    variants: Mapping[str, ImageVariantSandbox] | None = None,
    variants_missing: str = "this runner has the task image only",
) -> Callable[[str], TaskProfile]:
    """A tenant's name -> the profile its tasks run under, from this runner's own bundle.

    Every profile is resolved once, here (one verdict cache per import policy); a tenant
    without a profile gets the pipeline's defaults (``limits``, ``analyzer``). What a
    broker sends is only the tenant's name: never a limit above this runner's ceilings.
    """
    resolved: dict[str, TaskProfile] = {}
    for name, tenant in policy.tenants.items():
        assert tenant.profile is not None  # the policy's tenants are its profiles
        file = tenant.profile.file
        refusal = None
        variant = None
        if tenant.image_variant is not None:
            variant = (variants or {}).get(tenant.image_variant)
        if tenant.runtime != "standard" and tenant.runtime != runtime_tier:
            refusal = (
                f"Tenant {name}'s profile ({file}) requires the {tenant.runtime} runtime "
                f"tier; this runner's is {runtime_tier} (SANDBOX_OCI_RUNTIME=runsc gives gvisor)"
            )
        elif tenant.image_variant is not None and variant is None:
            refusal = (
                f"Tenant {name}'s profile ({file}) asks for the image variant "
                f"{tenant.image_variant!r}; {variants_missing}"
            )
        resolved[name] = TaskProfile(
            tenant=name,
            limits=tenant.limits,
            analyzer=Analyzer(tenant.import_policy),
            guards=tenant.guards,
            audit=tenant.audit(),
            sets=frozenset(_REQUESTABLE[key] for key in tenant.sets if key in _REQUESTABLE),
            source=f"tenant {name}'s profile, {file}",
            refusal=refusal,
            variant=variant,
        )

    def profile_of(name: str) -> TaskProfile:
        found = resolved.get(name)
        if found is not None:
            return found
        no_profile = {"name": name, "profile": None, "profileSha256": None}
        return TaskProfile(name, limits, analyzer, policy.guards, no_profile)

    return profile_of
