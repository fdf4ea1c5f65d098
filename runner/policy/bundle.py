"""A bundle's files, read, validated and hashed: :class:`PolicyBundle`.

Owns: reading ``sandbox.toml``, the two profiles it names (which must stay inside
the bundle's directory) and the tenant profiles in ``tenants/``, their validation
against the schemas of :mod:`runner.policy.model`, :mod:`runner.policy.seccomp` and
:mod:`runner.policy.tenant`, and the bundle's sha256 (over names and contents: a
rename changes it too; every tenant profile is in it, and each has its own).
:func:`parse_bundle` turns every problem into a :class:`~runner.policy.model.Finding`
and raises nothing; judging a valid bundle is :mod:`runner.policy.lint`'s job,
refusing to run under a bad one is :func:`runner.policy.effective.load_bundle`'s.

Must not import: the docker_default, lint, explain or effective modules of this
package (they build on this one), :mod:`runner.settings`, docker or the sandbox
implementations.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from pydantic import ValidationError

from runner.policy.model import (
    POLICY_FILE,
    Finding,
    PolicyConfig,
    limits_of,
    variant_lock_file,
)
from runner.policy.seccomp import SeccompProfile
from runner.policy.tenant import TENANTS_DIR, TenantConfig, TenantProfile, profile_name
from runner.sandbox.base import Limits


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """The files of one bundle, validated and hashed. Immutable."""

    directory: Path
    config: PolicyConfig
    seccomp: SeccompProfile
    seccomp_json: str  # compact, as handed to Docker
    apparmor_text: str
    sha256: str
    seccomp_sha256: str
    files: tuple[str, ...]  # the hashed files, relative, in hashing order
    warnings: tuple[Finding, ...] = ()
    # Tenant name -> its profile (tenants/<name>.toml); a tenant not here gets the defaults.
    tenants: Mapping[str, TenantProfile] = field(default_factory=lambda: MappingProxyType({}))
    # The top-level modules the package lock says its wheels provide (empty: no lock);
    # what [image] preload may name (runner.policy.lint).
    lock_provides: frozenset[str] = frozenset()
    # The same for each [image.variants] image, by variant name.
    variant_provides: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Every lock's pins (``name==version``), by variant (None: the default image's).
    lock_pins: Mapping[str | None, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def seccomp_path(self) -> Path:
        return self.directory / self.config.seccomp.profile

    @property
    def apparmor_path(self) -> Path:
        return self.directory / self.config.apparmor.file

    @property
    def default_limits(self) -> Limits:
        return limits_of(self.config.limits, "default")


def bundle_sha256(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (relative name, content) pairs in name order: a rename changes it too."""
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(content)
        digest.update(b"\0")
    return digest.hexdigest()


def parse_bundle(directory: Path) -> tuple[PolicyBundle | None, list[Finding]]:
    """Read and validate a bundle; every problem becomes a finding (nothing raises)."""
    findings: list[Finding] = []
    toml_path = directory / POLICY_FILE
    try:
        raw_toml = toml_path.read_bytes()
    except OSError as exc:
        return None, [Finding("files.missing", POLICY_FILE, f"cannot read: {exc.strerror}")]
    try:
        config = PolicyConfig.model_validate(tomllib.loads(raw_toml.decode("utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, [Finding("schema.syntax", POLICY_FILE, f"not valid TOML: {exc}")]
    except ValidationError as exc:
        return None, _schema_findings(POLICY_FILE, exc)

    files: list[tuple[str, bytes]] = [(POLICY_FILE, raw_toml)]
    seccomp: SeccompProfile | None = None
    raw_seccomp = b""
    seccomp_name = config.seccomp.profile
    if seccomp_name == "unconfined":
        findings.append(
            Finding("seccomp.unconfined", POLICY_FILE, "[seccomp] profile = 'unconfined'")
        )
    elif (problem := _bundle_path_problem(directory, seccomp_name)) is not None:
        findings.append(Finding("files.outside-bundle", POLICY_FILE, f"[seccomp] {problem}"))
    else:
        try:
            raw_seccomp = (directory / seccomp_name).read_bytes()
            seccomp = SeccompProfile.model_validate(json.loads(raw_seccomp))
            files.append((seccomp_name, raw_seccomp))
        except OSError as exc:
            findings.append(
                Finding("files.missing", POLICY_FILE, f"[seccomp] {seccomp_name}: {exc.strerror}")
            )
        except ValueError as exc:  # JSON syntax (ValidationError is a ValueError too)
            if isinstance(exc, ValidationError):
                findings.extend(_schema_findings(seccomp_name, exc))
            else:
                findings.append(Finding("schema.syntax", seccomp_name, f"not valid JSON: {exc}"))

    apparmor_text = ""
    apparmor_name = config.apparmor.file
    if (problem := _bundle_path_problem(directory, apparmor_name)) is not None:
        findings.append(Finding("files.outside-bundle", POLICY_FILE, f"[apparmor] {problem}"))
    else:
        try:
            raw_apparmor = (directory / apparmor_name).read_bytes()
            apparmor_text = raw_apparmor.decode("utf-8")
            files.append((apparmor_name, raw_apparmor))
        except OSError as exc:
            findings.append(
                Finding("files.missing", POLICY_FILE, f"[apparmor] {apparmor_name}: {exc.strerror}")
            )
        except UnicodeDecodeError:
            findings.append(Finding("schema.syntax", apparmor_name, "not UTF-8 text"))

    tenants, tenant_files, tenant_findings = _parse_tenants(directory)
    findings.extend(tenant_findings)
    files.extend(tenant_files)
    # The package lock says which wheels the task image holds: what tasks run under,
    # so it is hashed with the rest (runner.sandbox.packages checks it against the
    # request when the image is built).
    # Each image variant's lock likewise: a tenant's tasks run on what it pins.
    provides: dict[str | None, frozenset[str]] = {}
    pins: dict[str | None, tuple[str, ...]] = {}
    for variant in config.image.packages_by_image():
        lock_file = variant_lock_file(variant)
        try:
            raw_lock = (directory / lock_file).read_bytes()
        except FileNotFoundError:
            provides[variant], pins[variant] = frozenset(), ()
            continue
        except OSError as exc:
            findings.append(Finding("files.missing", lock_file, f"cannot read: {exc.strerror}"))
            continue
        files.append((lock_file, raw_lock))
        provides[variant] = lock_modules(raw_lock.decode("utf-8", "replace"))
        pins[variant] = lock_pins(raw_lock.decode("utf-8", "replace"))

    if seccomp is None or findings:
        return None, findings
    bundle = PolicyBundle(
        directory=directory,
        config=config,
        seccomp=seccomp,
        seccomp_json=json.dumps(json.loads(raw_seccomp), separators=(",", ":")),
        apparmor_text=apparmor_text,
        sha256=bundle_sha256(files),
        seccomp_sha256=hashlib.sha256(raw_seccomp).hexdigest(),
        files=tuple(sorted(name for name, _ in files)),
        tenants=MappingProxyType(tenants),
        lock_provides=provides[None],
        variant_provides=MappingProxyType(
            {name: modules for name, modules in provides.items() if name is not None}
        ),
        lock_pins=MappingProxyType(pins),
    )
    return bundle, findings


# A lock's "provides" comment (its format is runner.sandbox.packages', which checks the
# whole lock when the image is built; a test pins that both read the same modules).
_LOCK_PROVIDES = re.compile(r"^\s+# provides: (?P<modules>.*)$", re.MULTILINE)


def lock_modules(text: str) -> frozenset[str]:
    """The top-level modules a lock's wheels provide, from its ``# provides:`` lines."""
    return frozenset(
        module.strip()
        for match in _LOCK_PROVIDES.finditer(text)
        for module in match["modules"].split(",")
        if module.strip() and module.strip() != "(no module)"
    )


_LOCK_PIN = re.compile(r"^(?P<pin>[A-Za-z0-9][A-Za-z0-9._-]*==\S+)", re.MULTILINE)


def lock_pins(text: str) -> tuple[str, ...]:
    """The ``name==version`` a lock pins, sorted (what `policy diff` compares)."""
    return tuple(sorted(match["pin"] for match in _LOCK_PIN.finditer(text)))


def _parse_tenants(
    directory: Path,
) -> tuple[dict[str, TenantProfile], list[tuple[str, bytes]], list[Finding]]:
    """The profiles in ``tenants/`` (none when the folder does not exist).

    Every entry of the folder must be a profile: a stray ``data.toml.bak``, ``Data.toml``
    or ``README`` is an error rather than a file silently left out of what runs (and
    out of the hash an auditor compares).
    """
    folder = directory / TENANTS_DIR
    if not folder.exists():
        return {}, [], []
    if (problem := _bundle_path_problem(directory, TENANTS_DIR)) is not None:
        return {}, [], [Finding("files.outside-bundle", TENANTS_DIR, problem)]
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return {}, [], [Finding("files.missing", TENANTS_DIR, f"cannot read: {exc.strerror}")]
    tenants: dict[str, TenantProfile] = {}
    files: list[tuple[str, bytes]] = []
    findings: list[Finding] = []
    for entry in entries:
        relative = f"{TENANTS_DIR}/{entry.name}"
        name = profile_name(entry.name)
        if name is None or not entry.is_file():
            findings.append(
                Finding(
                    "tenant.name",
                    relative,
                    "not a tenant profile: every entry of tenants/ must be a file "
                    "<name>.toml, the name lower-case letters, digits, '-' and '_' "
                    "(at most 63, starting with a letter or digit)",
                )
            )
            continue
        if (problem := _bundle_path_problem(directory, relative)) is not None:
            findings.append(Finding("files.outside-bundle", relative, problem))
            continue
        try:
            raw = entry.read_bytes()
            config = TenantConfig.model_validate(tomllib.loads(raw.decode("utf-8")))
        except OSError as exc:
            findings.append(Finding("files.missing", relative, f"cannot read: {exc.strerror}"))
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            findings.append(Finding("schema.syntax", relative, f"not valid TOML: {exc}"))
            continue
        except ValidationError as exc:
            findings.extend(_schema_findings(relative, exc))
            continue
        files.append((relative, raw))
        tenants[name] = TenantProfile(name, relative, config, bundle_sha256([(relative, raw)]))
    return tenants, files, findings


def _schema_findings(file: str, exc: ValidationError) -> list[Finding]:
    findings = []
    for error in exc.errors():
        where = _location(error["loc"])
        findings.append(Finding("schema", file, f"{where}: {error['msg']}"))
    return findings


def _location(loc: tuple[int | str, ...]) -> str:
    """``('limits', 'memory_mb', 'default')`` -> ``[limits] memory_mb.default``."""
    parts = [str(part) for part in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return parts[0]
    return f"[{parts[0]}] " + ".".join(parts[1:])


def _bundle_path_problem(directory: Path, relative: str) -> str | None:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        return f"{relative!r} must be a path inside the bundle"
    resolved = (directory / relative).resolve()
    if directory.resolve() not in resolved.parents:
        return f"{relative!r} resolves outside the bundle"
    return None
