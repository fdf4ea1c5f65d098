"""Tenant profiles: ``tenants/<name>.toml``, one tenant's overlay of the bundle's defaults.

Owns: the schema of a profile (pydantic, frozen, unknown keys refused: like
``sandbox.toml``, a profile is a trust boundary edited by people), the rules a
profile must keep against the bundle it belongs to (:func:`check_tenant`: every
limit within the bundle's ceiling and above the floor in code, every allowlist
within its ceiling, a valid name), and what a tenant's values are once the profile
is laid over the bundle's defaults (:func:`tenant_limit_values`,
:func:`tenant_allowlist`).

A profile may set, for its tenant only: per-task limits (each at most the bundle's
ceiling), the import allowlists (each within its ceiling), the runtime tier
(``standard``, or ``gvisor``: the tenant's tasks must run under gVisor), the name of
an image variant, and the broker's quota of its running tasks. Whatever it does not
set is the default. It can never touch what is bundle-wide (the container's
switches, seccomp, AppArmor, the ceilings, the builtins deny list, the self-check):
those keys do not exist in its schema.

Must not import: any other module of :mod:`runner.policy` but the model (the bundle
reads profiles with this schema), :mod:`runner.settings`, docker or the sandbox
implementations. It reads no file and no environment.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from runner.analyzer import parse_allowlist
from runner.policy.model import (
    VARIANT_NAME,
    Finding,
    FrozenModel,
    PolicyConfig,
    Severity,
    format_number,
    limit_minimum,
    wider_than,
)

#: The folder of a bundle that holds the profiles, one ``<name>.toml`` per tenant.
TENANTS_DIR = "tenants"
#: A tenant's name, as a profile's file name spells it (without ``.toml``). Lower case,
#: so that ``Data.toml`` and ``data.toml`` can never name two profiles of one tenant on
#: a case-insensitive file system.
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PROFILE_SUFFIX = ".toml"
#: Runtime tiers, weakest first. ``standard``: whatever runtime the runner uses (runc,
#: crun, Docker's); ``gvisor``: only a runner on runsc may run the tenant's tasks.
RUNTIME_TIERS = ("standard", "gvisor")
#: The most tasks a tenant may have running at once, whatever its profile says (the
#: broker's own cap of unfinished tasks per tenant).
MAXIMUM_QUOTA = 1000


class TenantLimits(FrozenModel):
    """The tenant's per-task limits, in ``[limits]``'s keys and units; unset: the default.

    Each is what the tenant's tasks get, and the most any of them may ask for.
    """

    timeout_s: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    cpus: float | None = Field(None, gt=0)
    pids: int | None = Field(None, gt=0)
    tmpfs_mb: int | None = Field(None, gt=0)
    output_bytes: int | None = Field(None, gt=0)
    nofile: int | None = Field(None, gt=0)
    fsize_mb: int | None = Field(None, gt=0)
    nproc: int | None = Field(None, gt=0)
    code_bytes: int | None = Field(None, gt=0)

    def values(self) -> dict[str, float | int]:
        """The limits the profile sets, by ``[limits]`` key."""
        return {
            name: value
            for name in type(self).model_fields
            if (value := getattr(self, name)) is not None
        }


class TenantImports(FrozenModel):
    """The tenant's import allowlists; unset: the default list (``*`` alone: any)."""

    stdlib_allow: tuple[str, ...] | None = None
    external_allow: tuple[str, ...] | None = None


class TenantConfig(FrozenModel):
    """``tenants/<name>.toml``, validated."""

    version: Literal[1]
    runtime: Literal["standard", "gvisor"] = "standard"
    # One of the bundle's [image.variants] (`policy lint`: tenant.image-variant-unknown).
    image_variant: str | None = Field(None, pattern=VARIANT_NAME)
    quota: int | None = Field(None, ge=1, le=MAXIMUM_QUOTA)
    limits: TenantLimits = TenantLimits()
    imports: TenantImports = TenantImports()


@dataclass(frozen=True, slots=True)
class TenantProfile:
    """One profile of a bundle: its tenant's name, its file, its content and its hash."""

    name: str
    file: str  # relative to the bundle: tenants/<name>.toml
    config: TenantConfig
    sha256: str  # over its relative name and content, as the bundle's (a rename changes it)


def profile_name(file_name: str) -> str | None:
    """The tenant a file of ``tenants/`` is the profile of, or None if it is no profile."""
    if not file_name.endswith(PROFILE_SUFFIX):
        return None
    name = file_name.removesuffix(PROFILE_SUFFIX)
    return name if TENANT_NAME.match(name) else None


def check_tenant(profile: TenantProfile, config: PolicyConfig) -> list[Finding]:
    """Every rule a profile breaks against the bundle it belongs to."""
    findings: list[Finding] = []

    def add(rule: str, message: str, severity: Severity = Severity.ERROR) -> None:
        findings.append(Finding(rule, profile.file, message, severity))

    bounds = config.limits.bounds()
    for name, value in profile.config.limits.values().items():
        ceiling = bounds[name].ceiling
        if value > ceiling:
            add(
                "tenant.limit-above-ceiling",
                f"[limits] {name} = {format_number(value)} is above the bundle's ceiling "
                f"{format_number(ceiling)} ([limits] {name}.ceiling of sandbox.toml)",
            )
        minimum = limit_minimum(name)
        if value < minimum:
            add(
                "tenant.limit-below-minimum",
                f"[limits] {name} = {format_number(value)} is below the minimum "
                f"{format_number(minimum)} (a limit that rounds to nothing is no limit)",
            )
    variant = profile.config.image_variant
    if variant is not None and variant not in config.image.variants:
        declared = ", ".join(sorted(config.image.variants)) or "none"
        add(
            "tenant.image-variant-unknown",
            f"image_variant = {variant!r} is not one of the bundle's [image.variants] "
            f"(declared: {declared})",
        )
    imports = profile.config.imports
    for kind in ("stdlib", "external"):
        entries = getattr(imports, f"{kind}_allow")
        if entries is None:
            continue
        try:
            parse_allowlist(",".join(entries), f"[imports] {kind}_allow")
        except ValueError as exc:
            add("tenant.imports-wildcard", str(exc))
        allow_ceiling = frozenset(getattr(config.imports, f"{kind}_allow_ceiling"))
        wider = wider_than(frozenset(entries), allow_ceiling)
        if wider:
            add(
                "tenant.imports-above-ceiling",
                f"[imports] {kind}_allow allows {', '.join(wider)}, beyond the bundle's "
                f"{kind}_allow_ceiling",
            )
    unknown = sorted(
        name
        for name in imports.stdlib_allow or ()
        if name != "*" and name not in sys.stdlib_module_names
    )
    if unknown:
        add(
            "tenant.unknown-module",
            f"[imports] not standard-library modules: {', '.join(unknown)}",
            Severity.WARNING,
        )
    return findings


def tenant_limit_values(
    config: PolicyConfig, profile: TenantProfile | None
) -> dict[str, float | int]:
    """The tenant's value of every ``[limits]`` key: its profile's, else the default."""
    values: dict[str, float | int] = {
        name: bound.default for name, bound in config.limits.bounds().items()
    }
    if profile is not None:
        values |= profile.config.limits.values()
    return values


def tenant_allowlist(
    config: PolicyConfig, profile: TenantProfile | None, kind: Literal["stdlib", "external"]
) -> tuple[str, ...]:
    """The tenant's allowlist of ``kind``: its profile's, else the bundle's default."""
    own = None if profile is None else getattr(profile.config.imports, f"{kind}_allow")
    return tuple(own if own is not None else getattr(config.imports, f"{kind}_allow"))
