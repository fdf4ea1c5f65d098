"""``sandbox-runner policy diff``: what two policies let a task do differently.

Owns: :func:`diff_policies` and its result (:class:`PolicyDiff`, a list of
:class:`Difference`): two bundles, or two tenants of one bundle, or one tenant in two
bundles, compared value by value where a value decides what a task may do: limits
(the tenant's values and the ceilings), import allowlists and the builtins deny list,
the container's switches and capabilities, every system call's verdict on every
native architecture (as :func:`~runner.policy.docker_default.compare_with_docker`
resolves them, runc's ENOSYS stub included), the AppArmor rules, the self-check's
guarantees, the image's identity, a tenant's runtime tier, image variant and quota.
Each difference says whether it lets a task do more (``wider``), less
(``narrower``), or something else (``changed``): the question a security review asks
of every policy change. Comments, ordering and file names are no difference; the
hashes are shown beside the result, never as one.

Scopes: ``bundle`` holds what is bundle-wide (every tenant gets it); ``defaults`` what
a tenant without a profile gets; ``tenant NAME`` what a profile may set, for that
tenant (its profile's value, else the default: a changed default shows in every
tenant that does not set the key itself).

Must not import: the lint or effective modules of this package (comparing judges
neither the rules nor the settings), :mod:`runner.settings`, docker or the sandbox
implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from runner.policy.bundle import PolicyBundle
from runner.policy.docker_default import compare_with_docker
from runner.policy.explain import apparmor_rules
from runner.policy.model import format_number, wider_than
from runner.policy.seccomp import ARCHES
from runner.policy.tenant import RUNTIME_TIERS, tenant_allowlist, tenant_limit_values


class Effect(StrEnum):
    WIDER = "wider"  # a task may do more under b than under a
    NARROWER = "narrower"  # less
    CHANGED = "changed"  # something else (a name, a mode, conditions that moved)


@dataclass(frozen=True, slots=True)
class Difference:
    scope: str  # "bundle", "defaults", "tenant NAME" (or "tenant A -> B")
    key: str  # "limits.memory_mb", "seccomp.ptrace (x86_64)", "container.cap_add"
    a: Any
    b: Any
    effect: Effect
    added: tuple[str, ...] = ()  # for lists: what b has and a has not
    removed: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.added or self.removed:
            return " ".join([*(f"+{x}" for x in self.added), *(f"-{x}" for x in self.removed)])
        return f"{_show(self.a)} -> {_show(self.b)}"

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "scope": self.scope,
            "key": self.key,
            "a": self.a,
            "b": self.b,
            "effect": self.effect.value,
        }
        if self.added or self.removed:
            document |= {"added": list(self.added), "removed": list(self.removed)}
        return document


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    a: dict[str, Any]  # which bundle and tenant, with their hashes
    b: dict[str, Any]
    differences: tuple[Difference, ...]

    @property
    def is_same(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "same": self.is_same,
            "differences": [d.as_json() for d in self.differences],
        }


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return format_number(value)


# -- how a change of each kind of value reads -------------------------------------------
# A view maps a key to (kind, value); the kind says which way is wider.

Comparer = Callable[[Any, Any], tuple[Effect, tuple[str, ...], tuple[str, ...]]]


def _more(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
    if a is None or b is None:
        return Effect.CHANGED, (), ()
    return (Effect.WIDER if b > a else Effect.NARROWER), (), ()


def _value(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
    return Effect.CHANGED, (), ()


def _flag(wider_when: bool) -> Comparer:
    def compare(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
        return (Effect.WIDER if b is wider_when else Effect.NARROWER), (), ()

    return compare


def _tier(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
    stronger = RUNTIME_TIERS.index(b) > RUNTIME_TIERS.index(a)
    return (Effect.NARROWER if stronger else Effect.WIDER), (), ()


def _allowed(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
    """Lists of what is allowed (``*`` alone: anything): more entries, wider."""
    old, new = frozenset(a), frozenset(b)
    wider, narrower = wider_than(new, old), wider_than(old, new)
    effect = Effect.CHANGED if wider and narrower else Effect.WIDER if wider else Effect.NARROWER
    return effect, tuple(sorted(new - old)), tuple(sorted(old - new))


def _denied(a: Any, b: Any) -> tuple[Effect, tuple[str, ...], tuple[str, ...]]:
    """Lists of what is denied or required: more entries, narrower."""
    old, new = frozenset(a), frozenset(b)
    added, removed = tuple(sorted(new - old)), tuple(sorted(old - new))
    if added and removed:
        return Effect.CHANGED, added, removed
    return (Effect.NARROWER if added else Effect.WIDER), added, removed


View = dict[str, tuple[Comparer, Any]]


def bundle_view(bundle: PolicyBundle) -> View:
    """What is bundle-wide, key by key (every tenant gets it)."""
    config = bundle.config
    c, imports, selfcheck = config.container, config.imports, config.selfcheck
    view: View = {
        f"limits.{name}.ceiling": (_more, bound.ceiling)
        for name, bound in config.limits.bounds().items()
    }
    rules = [
        f"{title}: {rule}"
        for title, found in apparmor_rules(bundle.apparmor_text)
        for rule in found
    ]
    view |= {
        "image.repository": (_value, config.image.repository),
        "image.uid": (_value, config.image.uid),
        # Modules a warm slot's agent imports before its task: code loaded in the
        # process the task child forks from.
        "image.preload": (_allowed, sorted(config.image.preload)),
        "imports.stdlib_allow_ceiling": (_allowed, list(imports.stdlib_allow_ceiling)),
        "imports.external_allow_ceiling": (_allowed, list(imports.external_allow_ceiling)),
        "imports.builtins_deny": (_denied, sorted(set(imports.builtins_deny))),
        "imports.builtins_deny_floor": (_denied, sorted(set(imports.builtins_deny_floor))),
        "container.network_mode": (_value, c.network_mode),
        "container.read_only_rootfs": (_flag(wider_when=False), c.read_only_rootfs),
        "container.privileged": (_flag(wider_when=True), c.privileged),
        "container.cap_drop": (_denied, sorted(cap.upper() for cap in c.cap_drop)),
        "container.cap_add": (_allowed, sorted(cap.upper() for cap in c.cap_add)),
        "container.no_new_privileges": (_flag(wider_when=False), c.no_new_privileges),
        "container.pid_mode": (_value, c.pid_mode),
        "container.ipc_mode": (_value, c.ipc_mode),
        "container.cgroupns": (_value, c.cgroupns),
        "container.mounts": (
            _allowed,
            sorted(
                f"{m.type} {m.source or '-'} -> {m.target}{' (ro)' if m.read_only else ''}"
                for m in c.mounts
            ),
        ),
        "container.devices": (_allowed, sorted(c.devices)),
        "container.tmpfs": (_allowed, sorted(f"{t} {o}" for t, o in c.tmpfs.items())),
        "seccomp.default_action": (_value, bundle.seccomp.defaultAction),
        "seccomp.architectures": (
            _allowed,
            sorted(entry.architecture for entry in bundle.seccomp.archMap or ()),
        ),
        "apparmor.profile": (_value, config.apparmor.profile),
        # AppArmor: a new allow rule lets a task do more, a new deny rule less.
        "apparmor.rules": (_allowed, sorted(r for r in rules if " deny " not in f" {r} ")),
        "apparmor.deny_rules": (_denied, sorted(r for r in rules if " deny " in f" {r} ")),
        # Fewer guarantees required: less is proven before a task runs.
        "selfcheck.required": (_denied, sorted(selfcheck.required)),
        "selfcheck.optional": (_value, sorted(selfcheck.optional)),
        "selfcheck.canary_memory_mb": (_value, selfcheck.canary_memory_mb),
        "selfcheck.canary_pids": (_value, selfcheck.canary_pids),
        "selfcheck.canary_timeout_s": (_value, selfcheck.canary_timeout_s),
    }
    return view


def tenant_view(bundle: PolicyBundle, tenant: str | None) -> View:
    """What a profile may set, as the tenant gets it (``None``: a tenant without one)."""
    config = bundle.config
    profile = None if tenant is None else bundle.tenants.get(tenant)
    view: View = {
        f"limits.{name}": (_more, value)
        for name, value in tenant_limit_values(config, profile).items()
    }
    own = None if profile is None else profile.config
    variant = own.image_variant if own else None
    view |= {
        "imports.stdlib_allow": (_allowed, sorted(tenant_allowlist(config, profile, "stdlib"))),
        "imports.external_allow": (
            _allowed,
            sorted(tenant_allowlist(config, profile, "external")),
        ),
        "runtime": (_tier, own.runtime if own else "standard"),
        "image_variant": (_value, own.image_variant if own else None),
        # What the tenant's image holds (its lock's pins): a package added is code a
        # task may reach once external_allow names it.
        "image.packages": (_allowed, list(bundle.lock_pins.get(variant, ()))),
        "quota": (_more, own.quota if own else None),
    }
    return view


def _compare(scope: str, a: View, b: View) -> list[Difference]:
    differences = []
    for key, (compare, old) in a.items():
        new = b[key][1]
        if old == new:
            continue
        effect, added, removed = compare(old, new)
        differences.append(Difference(scope, key, old, new, effect, added, removed))
    return differences


def _seccomp(a: PolicyBundle, b: PolicyBundle) -> list[Difference]:
    """Every system call whose verdict differs, per native architecture."""
    if a.seccomp == b.seccomp:
        return []
    differences = []
    for arch in ARCHES:
        # compare_with_docker(ours, theirs): here "ours" is b, "theirs" is a.
        comparison = compare_with_docker(b.seccomp, a.seccomp, arch)
        for found, effect in (
            (comparison.allowed_only_by_ours, Effect.WIDER),
            (comparison.refused_only_by_ours, Effect.NARROWER),
            (comparison.narrowed_by_ours, Effect.CHANGED),
            (comparison.errno_differs, Effect.CHANGED),
        ):
            differences += [
                Difference("bundle", f"seccomp.{d.name} ({arch})", d.docker, d.ours, effect)
                for d in found
            ]
    return sorted(differences, key=lambda d: d.key)


def side(bundle: PolicyBundle, tenant: str | None) -> dict[str, Any]:
    """One side of a comparison, as the result names it."""
    document: dict[str, Any] = {"bundle": str(bundle.directory), "sha256": bundle.sha256}
    if tenant is not None:
        profile = bundle.tenants.get(tenant)
        document |= {
            "tenant": tenant,
            "profile": profile.file if profile else None,
            "profileSha256": profile.sha256 if profile else None,
        }
    return document


def diff_policies(
    a: PolicyBundle,
    b: PolicyBundle,
    *,
    tenant_a: str | None = None,
    tenant_b: str | None = None,
) -> PolicyDiff:
    """Every difference between ``a`` and ``b`` that changes what a task may do.

    With tenants: what the tenant gets in ``a`` against what the other gets in ``b``
    (one bundle given twice compares two tenants). Without: the bundles as wholes, the
    defaults and every tenant either bundle has a profile for.
    """
    differences = _compare("bundle", bundle_view(a), bundle_view(b)) + _seccomp(a, b)
    if tenant_a is not None or tenant_b is not None:
        scope = f"tenant {tenant_a}" if tenant_a == tenant_b else f"tenant {tenant_a} -> {tenant_b}"
        differences += _compare(scope, tenant_view(a, tenant_a), tenant_view(b, tenant_b))
    else:
        differences += _compare("defaults", tenant_view(a, None), tenant_view(b, None))
        for name in sorted(set(a.tenants) | set(b.tenants)):
            differences += _compare(f"tenant {name}", tenant_view(a, name), tenant_view(b, name))
    return PolicyDiff(side(a, tenant_a), side(b, tenant_b), tuple(differences))
