"""The policy every task runs under: the bundle loaded for use, with the settings applied.

Owns: :func:`load_bundle` (parse and lint; any error stops the runner at start with a
:class:`~runner.errors.ConfigurationError` built from the first one, naming the file
and the rule), :func:`resolve_policy` (settings may tighten the bundle's defaults,
never go beyond its ceilings nor below the floors in code), :class:`EffectivePolicy`
(the immutable result: limits, import policy, guards, AppArmor profile, which
settings tightened a default, and a :class:`TenantPolicy` per tenant profile) and
:func:`load_policy`.

A tenant's policy is its profile laid over this runner's: what the profile sets
replaces the runner's value (its setting, or the bundle's default) for that tenant
only, never beyond the bundle's ceilings (a profile that would is refused here too,
not only by the linter); what it does not set is the runner's. A tenant without a
profile gets the runner's policy.

The only module of the package that knows :class:`~runner.settings.Settings`; they are
passed in, never read from the environment here. Must not import: the explain or
docker_default modules of this package, docker or the sandbox implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runner.analyzer import ImportPolicy, import_error, parse_allowlist
from runner.errors import ConfigurationError
from runner.policy.bundle import PolicyBundle, parse_bundle
from runner.policy.lint import check_bundle
from runner.policy.model import (
    LIMIT_FIELDS,
    POLICY_FILE,
    Finding,
    Severity,
    format_number,
    wider_than,
)
from runner.policy.tenant import TenantProfile
from runner.sandbox.base import MIB, MINIMUM_LIMITS, GuardConfig, Limits
from runner.settings import Settings, env_name

# -- loading a bundle for use -----------------------------------------------------------


def load_bundle(directory: Path, *, enforce: bool = True) -> PolicyBundle:
    """Load a bundle for use: any error stops here with the file and the rule.

    ``enforce=False`` keeps schema errors fatal but lets rule violations through (as
    warnings on the bundle): only for diagnosing a weakened bundle with ``selfcheck``,
    never for running tasks.
    """
    bundle, findings = parse_bundle(directory)
    if bundle is None:
        raise _configuration_error(directory, findings)
    findings = check_bundle(bundle)
    errors = [finding for finding in findings if finding.severity is Severity.ERROR]
    if errors and enforce:
        raise _configuration_error(directory, errors)
    if not enforce:
        findings = [_as_warning(finding) for finding in findings]
    return _with_warnings(bundle, findings)


def _with_warnings(bundle: PolicyBundle, findings: list[Finding]) -> PolicyBundle:
    return replace(bundle, warnings=tuple(findings))


def _as_warning(finding: Finding) -> Finding:
    return replace(finding, severity=Severity.WARNING)


def _configuration_error(directory: Path, findings: list[Finding]) -> ConfigurationError:
    first = findings[0]
    more = f"; {len(findings) - 1} more problem(s)" if len(findings) > 1 else ""
    return ConfigurationError(
        f"Invalid policy bundle {directory}: {first}",
        hint=f"run `sandbox-runner policy lint {directory}` for every finding{more}",
    )


# -- bundle + settings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What one tenant's tasks run under on this runner: its profile over the runner's."""

    name: str
    profile: TenantProfile | None  # None: the tenant has no profile (the runner's policy)
    limits: Limits
    import_policy: ImportPolicy
    guards: GuardConfig
    runtime: str = "standard"  # runner.policy.tenant.RUNTIME_TIERS
    image_variant: str | None = None

    def audit(self) -> dict[str, str | None]:
        """The audit record's ``tenant``: who, and under which profile (by its hash)."""
        return {
            "name": self.name,
            "profile": self.profile.file if self.profile else None,
            "profileSha256": self.profile.sha256 if self.profile else None,
        }

    @property
    def sets(self) -> frozenset[str]:
        """The ``[limits]`` keys its profile sets (the others are the runner's)."""
        return frozenset(self.profile.config.limits.values()) if self.profile else frozenset()


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The bundle with the settings applied: what every task of this runner gets."""

    bundle: PolicyBundle
    limits: Limits
    import_policy: ImportPolicy
    guards: GuardConfig
    apparmor_profile: str
    tightened: tuple[str, ...] = field(default=())  # the settings that changed a default
    # Tenant name -> its policy, for every profile of the bundle (resolved at start, so
    # that a bad profile stops the runner before its first task).
    tenants: Mapping[str, TenantPolicy] = field(default_factory=lambda: MappingProxyType({}))

    def for_tenant(self, name: str) -> TenantPolicy:
        """The tenant's policy: its profile's, or this runner's when it has none."""
        found = self.tenants.get(name)
        if found is not None:
            return found
        return TenantPolicy(name, None, self.limits, self.import_policy, self.guards)

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @property
    def preload(self) -> tuple[str, ...]:
        """The modules a warm pool slot imports before its task: ``[image] preload``,
        less any this runner's allowlist (settings may narrow it) refuses: a slot never
        holds a module that the tasks it is made for may not import."""
        return tuple(
            name
            for name in self.bundle.config.image.preload
            if import_error(name, self.import_policy) is None
        )

    @property
    def user(self) -> str:
        uid = self.bundle.config.image.uid
        return f"{uid}:{uid}"

    def canary_limits(self) -> Limits:
        """The self-check canary's limits: small memory and pids so that both bite fast."""
        selfcheck = self.bundle.config.selfcheck
        return replace(
            self.limits,
            timeout_s=selfcheck.canary_timeout_s,
            memory_bytes=selfcheck.canary_memory_mb * MIB,
            pids=selfcheck.canary_pids,
        )

    def check_timeout(self, timeout_s: float, source: str) -> float:
        """A per-run timeout (``--timeout``) must stay between the minimum and the ceiling."""
        ceiling = self.bundle.config.limits.timeout_s.ceiling
        if timeout_s > ceiling:
            raise _above_ceiling(
                source, timeout_s, "[limits] timeout_s", ceiling, self.bundle.directory
            )
        if not timeout_s >= MINIMUM_LIMITS.timeout_s:  # NaN too
            raise ConfigurationError(
                f"{source}={format_number(timeout_s)} is below the minimum timeout of "
                f"{format_number(MINIMUM_LIMITS.timeout_s)} s",
                hint="a limit below its minimum is refused everywhere (policies/README.md 3.1)",
            )
        return timeout_s


def _above_ceiling(
    source: str, value: object, key: str, ceiling: object, directory: Path
) -> ConfigurationError:
    return ConfigurationError(
        f"{source}={format_number(value)} is above the policy ceiling {key} = "
        f"{format_number(ceiling)} ({directory / POLICY_FILE})",
        hint="settings may only tighten the policy bundle; raise the ceiling in a reviewed "
        "change of the bundle instead",
    )


def resolve_policy(bundle: PolicyBundle, settings: Settings) -> EffectivePolicy:
    """Apply settings to the bundle: tighter is fine, beyond a ceiling is an error."""
    config, tightened = bundle.config, []
    limit_values: dict[str, Any] = {}
    for setting, bound_name, factor, limits_field in LIMIT_FIELDS:
        bound = getattr(config.limits, bound_name)
        value = getattr(settings, setting)
        if value is None:
            value = bound.default
        else:
            if value > bound.ceiling:
                raise _above_ceiling(
                    env_name(setting),
                    value,
                    f"[limits] {bound_name}",
                    bound.ceiling,
                    bundle.directory,
                )
            tightened.append(setting)
        limit_values[limits_field] = value * factor if factor != 1 else value

    imports = config.imports
    stdlib = _allowlist(
        settings.stdlib_allow,
        imports.stdlib_allow,
        imports.stdlib_allow_ceiling,
        env_name("stdlib_allow"),
        "stdlib_allow_ceiling",
        bundle.directory,
    )
    external = _allowlist(
        settings.external_allow,
        imports.external_allow,
        imports.external_allow_ceiling,
        env_name("external_allow"),
        "external_allow_ceiling",
        bundle.directory,
    )
    if settings.builtins_deny is None:
        deny = tuple(sorted(set(imports.builtins_deny)))
    else:
        # n8n splits on "," and trims; an empty string denies nothing.
        deny = tuple(sorted({name.strip() for name in settings.builtins_deny.split(",")} - {""}))
        missing = sorted(set(imports.builtins_deny_floor) - set(deny))
        if missing:
            raise ConfigurationError(
                f"{env_name('builtins_deny')} must still deny {', '.join(missing)} "
                f"(builtins_deny_floor in {bundle.directory / POLICY_FILE})",
                hint="settings may only tighten the policy bundle",
            )
    for setting in ("stdlib_allow", "external_allow", "builtins_deny"):
        if getattr(settings, setting) is not None:
            tightened.append(setting)
    limits = Limits(**limit_values)
    below = limits.below_minimum()
    if below:
        # Settings cannot get here (their fields carry the same floors); a bundle loaded
        # with enforce=False can. Never run a task under a limit that means "none".
        raise ConfigurationError(
            f"Limits below their minimum ({bundle.directory / POLICY_FILE} or settings): "
            + ", ".join(below),
            hint="a limit below its minimum is refused everywhere (policies/README.md 3.1)",
        )
    import_policy = ImportPolicy(stdlib, external)
    guards = GuardConfig(
        stdlib_allow=tuple(sorted(stdlib)),
        external_allow=tuple(sorted(external)),
        builtins_deny=deny,
        block_env_access=settings.block_env_access,
        max_print_calls=settings.max_print_calls,
    )
    tenants = {
        name: resolve_tenant(bundle, profile, limits, import_policy, guards)
        for name, profile in sorted(bundle.tenants.items())
    }
    return EffectivePolicy(
        bundle=bundle,
        limits=limits,
        import_policy=import_policy,
        guards=guards,
        apparmor_profile=settings.apparmor_profile or config.apparmor.profile,
        tightened=tuple(tightened),
        tenants=MappingProxyType(tenants),
    )


def resolve_tenant(
    bundle: PolicyBundle,
    profile: TenantProfile,
    limits: Limits,
    import_policy: ImportPolicy,
    guards: GuardConfig,
) -> TenantPolicy:
    """A profile over the runner's limits and allowlists, checked against the ceilings.

    The linter refuses the same profiles (``tenant.*`` rules); checked again here because
    a bundle loaded with ``enforce=False`` reaches this point too, and no task may ever
    run above a ceiling.
    """
    where = f"{bundle.directory / profile.file}"
    own = profile.config
    changes: dict[str, Any] = {}
    for _, bound_name, factor, limits_field in LIMIT_FIELDS:
        value = getattr(own.limits, bound_name)
        if value is None:
            continue
        ceiling = getattr(bundle.config.limits, bound_name).ceiling
        if value > ceiling:
            raise ConfigurationError(
                f"Tenant profile {where}: [limits] {bound_name} = {format_number(value)} is "
                f"above the bundle's ceiling {format_number(ceiling)} [tenant.limit-above-ceiling]",
                hint="a tenant profile may only stay within the bundle's ceilings",
            )
        changes[limits_field] = value * factor if factor != 1 else value
    tenant_limits = replace(limits, **changes)
    below = tenant_limits.below_minimum()
    if below:
        raise ConfigurationError(
            f"Tenant profile {where}: limits below their minimum: {', '.join(below)}",
            hint="a limit below its minimum is refused everywhere (policies/README.md 3.1)",
        )
    imports = bundle.config.imports
    stdlib, external = import_policy.stdlib_allow, import_policy.external_allow
    if own.imports.stdlib_allow is not None:
        stdlib = _profile_allowlist(own.imports.stdlib_allow, imports.stdlib_allow_ceiling, where)
    if own.imports.external_allow is not None:
        external = _profile_allowlist(
            own.imports.external_allow, imports.external_allow_ceiling, where
        )
    return TenantPolicy(
        name=profile.name,
        profile=profile,
        limits=tenant_limits,
        import_policy=ImportPolicy(stdlib, external),
        guards=replace(
            guards, stdlib_allow=tuple(sorted(stdlib)), external_allow=tuple(sorted(external))
        ),
        runtime=own.runtime,
        image_variant=own.image_variant,
    )


def _profile_allowlist(
    entries: tuple[str, ...], ceiling: tuple[str, ...], where: str
) -> frozenset[str]:
    try:
        allowed = parse_allowlist(",".join(entries), f"{where} [imports]")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    wider = wider_than(allowed, frozenset(ceiling))
    if wider:
        raise ConfigurationError(
            f"Tenant profile {where} allows {', '.join(wider)}, beyond the policy's ceiling",
            hint="a tenant profile may only narrow, or stay within, the bundle's ceilings",
        )
    return allowed


def _allowlist(
    raw: str | None,
    default: tuple[str, ...],
    ceiling: tuple[str, ...],
    variable: str,
    ceiling_key: str,
    directory: Path,
) -> frozenset[str]:
    if raw is None:
        return frozenset(default)
    entries = parse_allowlist(raw, variable)
    wider = wider_than(entries, frozenset(ceiling))
    if wider:
        raise ConfigurationError(
            f"{variable} allows {', '.join(wider)}, beyond the policy's {ceiling_key} "
            f"({directory / POLICY_FILE})",
            hint="settings may only tighten the policy bundle",
        )
    return entries


def load_policy(settings: Settings, *, enforce: bool = True) -> EffectivePolicy:
    """The bundle at ``settings.policy_dir`` with the settings applied."""
    return resolve_policy(load_bundle(settings.policy_dir, enforce=enforce), settings)
