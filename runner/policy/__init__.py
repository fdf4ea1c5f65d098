"""The policy bundle in ``policies/``: load it, validate it, hash it, lint it, explain it.

Owns: the schema of ``sandbox.toml`` and of the seccomp profile (pydantic, frozen:
these files are a trust boundary, edited by people), the lint rules that keep a
bundle from opening the container, the sha256 of the bundle, and the merge with
:class:`~runner.settings.Settings` (settings may tighten the bundle, never loosen it
beyond its ceilings). It hands immutable objects down: :class:`PolicyBundle` (the
files, validated) and :class:`EffectivePolicy` (bundle + settings: the limits and
guards every task gets).

Every problem is a :class:`Finding` naming the file and the rule; loading stops at
start with a :class:`~runner.errors.ConfigurationError` built from the first
error, ``sandbox-runner policy lint`` shows them all.

The modules, each importing only those above it:

- :mod:`.model`: the ``sandbox.toml`` schema, :class:`Finding`, the guarantees, the
  ``[limits]`` table (keys, units, floors);
- :mod:`.seccomp`: Docker's seccomp format, per-call verdicts, the system-call table,
  the rules a profile must keep;
- :mod:`.tenant`: the schema of a tenant profile (``tenants/<name>.toml``), its rules
  against the bundle's ceilings, a tenant's values over the defaults;
- :mod:`.bundle`: :class:`PolicyBundle`, reading, validating and hashing the files;
- :mod:`.docker_default`: Docker's default profile and :func:`compare_with_docker`;
- :mod:`.lint`: :func:`check_bundle` and its rules, :func:`lint_bundle`;
- :mod:`.explain`: :func:`explain_bundle`;
- :mod:`.diff`: :func:`diff_policies`, every difference that changes what a task may do;
- :mod:`.effective`: :func:`load_bundle`, :func:`resolve_policy`,
  :class:`EffectivePolicy`, :func:`load_policy`.

This file only re-exports their public API (the modules import each other directly,
never through it). Must not, anywhere in the package: read the environment (settings
are passed in), import docker or the sandbox implementations.
"""

from __future__ import annotations

from runner.policy.bundle import PolicyBundle, bundle_sha256, parse_bundle
from runner.policy.diff import Difference, Effect, PolicyDiff, diff_policies
from runner.policy.docker_default import (
    DOCKER_DEFAULT_PROFILE,
    DockerComparison,
    compare_with_docker,
    docker_default_profile,
)
from runner.policy.effective import (
    EffectivePolicy,
    TenantPolicy,
    load_bundle,
    load_policy,
    resolve_policy,
)
from runner.policy.explain import explain_bundle
from runner.policy.lint import MAY_BE_OPTIONAL, LintReport, check_bundle, lint_bundle
from runner.policy.model import GUARANTEES, POLICY_FILE, Finding, PolicyConfig, Severity
from runner.policy.seccomp import ARCHES, REQUIRED_REFUSALS, SeccompProfile, syscall_table
from runner.policy.tenant import TENANTS_DIR, TenantProfile

__all__ = [
    "ARCHES",
    "DOCKER_DEFAULT_PROFILE",
    "GUARANTEES",
    "MAY_BE_OPTIONAL",
    "POLICY_FILE",
    "REQUIRED_REFUSALS",
    "TENANTS_DIR",
    "Difference",
    "DockerComparison",
    "Effect",
    "EffectivePolicy",
    "Finding",
    "LintReport",
    "PolicyBundle",
    "PolicyConfig",
    "PolicyDiff",
    "SeccompProfile",
    "Severity",
    "TenantPolicy",
    "TenantProfile",
    "bundle_sha256",
    "check_bundle",
    "compare_with_docker",
    "diff_policies",
    "docker_default_profile",
    "explain_bundle",
    "lint_bundle",
    "load_bundle",
    "load_policy",
    "parse_bundle",
    "resolve_policy",
    "syscall_table",
]
