"""``sandbox-runner policy explain``: what a task may and may not do, read from the bundle.

Owns: :func:`explain_bundle` (one JSON-ready document: the limits with their floors,
the container, the import lists, the seccomp rules grouped by verdict, the AppArmor
rules and the self-check's guarantees; for one tenant, with its profile laid over
the defaults) and :func:`apparmor_rules` (a profile's rules
grouped under its ``# ---- section ----`` comments). The text rendering is the command
line's; both forms are pinned by the snapshots in ``tests/fixtures/``.

Must not import: the lint or effective modules of this package (explaining neither
judges a bundle nor applies settings), :mod:`runner.settings`, docker or the sandbox
implementations.
"""

from __future__ import annotations

import re
from typing import Any

from runner.policy.bundle import PolicyBundle
from runner.policy.model import GUARANTEES, LIMIT_FIELDS, limit_minimum
from runner.policy.seccomp import ARCHES, errno_name
from runner.policy.tenant import tenant_allowlist, tenant_limit_values

APPARMOR_SECTION = re.compile(r"^\s*#\s*-{2,}\s*(.+?)\s*-{2,}\s*$")


def apparmor_rules(text: str) -> list[tuple[str, list[str]]]:
    """The profile's rules, grouped under its ``# ---- section ----`` comments."""
    sections: list[tuple[str, list[str]]] = []
    inside = False
    for line in text.splitlines():
        header = APPARMOR_SECTION.match(line)
        if header and inside:
            sections.append((header.group(1), []))
            continue
        stripped = line.split("#", 1)[0].strip() if not line.strip().startswith("#") else ""
        if not stripped:
            continue
        if stripped.startswith("profile ") and stripped.endswith("{"):
            inside = True
            sections.append(("profile", []))
            continue
        if stripped == "}":
            inside = False
            continue
        if inside:
            sections[-1][1].append(stripped.rstrip(","))
    return [(title, rules) for title, rules in sections if rules]


def explain_bundle(bundle: PolicyBundle, tenant: str | None = None) -> dict[str, Any]:
    """What a task may and may not do, read from the bundle's files (JSON-ready).

    ``tenant``: what one tenant's tasks may do: its profile (``tenants/<name>.toml``)
    laid over the defaults, or the defaults when it has none; the document then has a
    ``tenant`` section, and each limit's ``default`` is the tenant's value.
    """
    config = bundle.config
    c = config.container
    profile = None if tenant is None else bundle.tenants.get(tenant)
    values = tenant_limit_values(config, profile)
    minimums = {bound_name: limit_minimum(bound_name) for _, bound_name, _, _ in LIMIT_FIELDS}
    limits = {
        name: {"default": values[name], "ceiling": bound.ceiling, "minimum": minimums[name]}
        for name, bound in config.limits.bounds().items()
    }
    groups_allowed: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for rule in bundle.seccomp.syscalls:
        go_arches = [go for _, go in ARCHES.values() if rule.applies(go)]
        entry: dict[str, Any] = {"syscalls": list(rule.names), "why": rule.comment}
        if len(go_arches) < len(ARCHES):
            entry["only"] = go_arches
        if rule.action == "SCMP_ACT_ALLOW" and not rule.args:
            groups_allowed.append(entry)
        elif rule.action == "SCMP_ACT_ALLOW":
            entry["when"] = " and ".join(arg.describe() for arg in rule.args or ())
            filtered.append(entry)
        else:
            errno = rule.errnoRet if rule.errnoRet is not None else 1
            entry["answer"] = errno_name(errno) if rule.action == "SCMP_ACT_ERRNO" else rule.action
            refused.append(entry)
    native = [entry.architecture for entry in bundle.seccomp.archMap or ()]
    document: dict[str, Any] = {
        "bundle": str(bundle.directory),
        "sha256": bundle.sha256,
        "files": list(bundle.files),
        "limits": limits,
        "image": {
            "repository": config.image.repository,
            "uid": config.image.uid,
            "pythonPackages": list(config.image.python_packages),
            "preload": list(config.image.preload),
            **_variants(bundle),
        },
        "container": {
            "network": c.network_mode,
            "readOnlyRootfs": c.read_only_rootfs,
            "privileged": c.privileged,
            "capDrop": list(c.cap_drop),
            "capAdd": list(c.cap_add),
            "noNewPrivileges": c.no_new_privileges,
            "pidMode": c.pid_mode,
            "ipcMode": c.ipc_mode,
            "cgroupns": c.cgroupns,
            "mounts": [m.model_dump() for m in c.mounts],
            "devices": list(c.devices),
            "tmpfs": dict(c.tmpfs),
        },
        "imports": {
            "stdlibAllow": list(tenant_allowlist(config, profile, "stdlib")),
            "stdlibAllowCeiling": list(config.imports.stdlib_allow_ceiling),
            "externalAllow": list(tenant_allowlist(config, profile, "external")),
            "externalAllowCeiling": list(config.imports.external_allow_ceiling),
            "builtinsDeny": list(config.imports.builtins_deny),
            "builtinsDenyFloor": list(config.imports.builtins_deny_floor),
        },
        "seccomp": {
            "file": config.seccomp.profile,
            "sha256": bundle.seccomp_sha256,
            "defaultAction": bundle.seccomp.defaultAction,
            "defaultAnswer": errno_name(bundle.seccomp.default_errno())
            if bundle.seccomp.default_errno()
            else bundle.seccomp.defaultAction,
            "architectures": native,
            "foreignAbis": "killed (SIGSYS): not in the filter",
            "allowed": groups_allowed,
            "allowedWithArguments": filtered,
            "refusedExplicitly": refused,
        },
        "apparmor": {
            "file": config.apparmor.file,
            "profile": config.apparmor.profile,
            "rules": [
                {"section": title, "rules": rules}
                for title, rules in apparmor_rules(bundle.apparmor_text)
            ],
        },
        "selfcheck": {
            "required": list(config.selfcheck.required),
            "optional": list(config.selfcheck.optional),
            "guarantees": {
                name: GUARANTEES.get(name, "?")
                for name in (*config.selfcheck.required, *config.selfcheck.optional)
            },
            "canary": {
                "memoryMb": config.selfcheck.canary_memory_mb,
                "pids": config.selfcheck.canary_pids,
                "timeoutS": config.selfcheck.canary_timeout_s,
            },
        },
    }
    if tenant is None:
        if bundle.tenants:  # only then: a bundle without profiles explains as it always did
            document["tenants"] = {
                name: bundle.tenants[name].sha256 for name in sorted(bundle.tenants)
            }
        return document
    return {**document, "tenant": explain_tenant(bundle, tenant)}


def _variants(bundle: PolicyBundle) -> dict[str, Any]:
    """``[image.variants]``, each with what it asks for and what its lock pins (the
    key only when the bundle declares one: a bundle without explains as it always did)."""
    variants = bundle.config.image.variants
    if not variants:
        return {}
    return {
        "variants": {
            name: {
                "pythonPackages": list(variant.python_packages),
                "locked": list(bundle.lock_pins.get(name, ())),
            }
            for name, variant in sorted(variants.items())
        }
    }


def explain_tenant(bundle: PolicyBundle, tenant: str) -> dict[str, Any]:
    """Who the tenant is to the bundle: its profile (or none), and what the profile sets."""
    profile = bundle.tenants.get(tenant)
    if profile is None:
        return {
            "name": tenant,
            "profile": None,
            "profileSha256": None,
            "runtime": "standard",
            "imageVariant": None,
            "quota": None,
            "sets": [],
        }
    tenant_config = profile.config
    sets = [f"limits.{name}" for name in tenant_config.limits.values()]
    sets += [
        f"imports.{kind}_allow"
        for kind in ("stdlib", "external")
        if getattr(tenant_config.imports, f"{kind}_allow") is not None
    ]
    return {
        "name": tenant,
        "profile": profile.file,
        "profileSha256": profile.sha256,
        "runtime": tenant_config.runtime,
        "imageVariant": tenant_config.image_variant,
        "quota": tenant_config.quota,
        "sets": sets,
    }
