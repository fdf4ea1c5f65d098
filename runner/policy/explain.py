"""``sandbox-runner policy explain``: what a task may and may not do, read from the bundle.

Owns: :func:`explain_bundle` (one JSON-ready document: the limits with their floors,
the container, the import lists, the seccomp rules grouped by verdict, the AppArmor
rules and the self-check's guarantees) and :func:`apparmor_rules` (a profile's rules
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


def explain_bundle(bundle: PolicyBundle) -> dict[str, Any]:
    """What a task may and may not do, read from the bundle's files (JSON-ready)."""
    config = bundle.config
    c = config.container
    minimums = {bound_name: limit_minimum(bound_name) for _, bound_name, _, _ in LIMIT_FIELDS}
    limits = {
        name: {"default": bound.default, "ceiling": bound.ceiling, "minimum": minimums[name]}
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
    return {
        "bundle": str(bundle.directory),
        "sha256": bundle.sha256,
        "files": list(bundle.files),
        "limits": limits,
        "image": {
            "repository": config.image.repository,
            "uid": config.image.uid,
            "pythonPackages": list(config.image.python_packages),
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
            "stdlibAllow": list(config.imports.stdlib_allow),
            "stdlibAllowCeiling": list(config.imports.stdlib_allow_ceiling),
            "externalAllow": list(config.imports.external_allow),
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
