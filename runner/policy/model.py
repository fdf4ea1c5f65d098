"""What the files of a policy bundle say: the schema of ``sandbox.toml``, and findings.

Owns: the pydantic models of ``sandbox.toml`` (frozen, unknown keys refused: the file
is a trust boundary, edited by people), :class:`Finding` and :class:`Severity` (every
problem names the file and the rule), the guarantees a ``[selfcheck]`` section may
list, and the table that maps each ``[limits]`` key to its
:class:`~runner.sandbox.base.Limits` field, unit and floor (shared by the linter,
``explain`` and the merge with settings).

Must not import: any other module of :mod:`runner.policy` (this is the bottom of the
package), :mod:`runner.settings`, docker or the sandbox implementations. It reads no
file and no environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.sandbox.base import MIB, MINIMUM_LIMITS, Limits

POLICY_FILE = "sandbox.toml"
# The lock of [image] python_packages, beside POLICY_FILE: part of the bundle (and of
# its sha256) when present. Written and read by runner.sandbox.packages (LOCK_FILE).
PACKAGE_LOCK_FILE = "python-packages.lock"
# An image variant's name ([image.variants.<name>], a tenant profile's image_variant).
VARIANT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def variant_lock_file(variant: str | None) -> str:
    """The lock of an image variant's packages (None: the default image's), beside
    POLICY_FILE: ``python-packages.<variant>.lock``."""
    return PACKAGE_LOCK_FILE if variant is None else f"python-packages.{variant}.lock"


#: Every guarantee the self-check proves, and what it means.
GUARANTEES: Mapping[str, str] = {
    "seccomp-filter": "a seccomp filter is installed (Seccomp: 2)",
    "seccomp-profile": "the filter is our profile: calls only it refuses answer EPERM",
    "no-new-privileges": "no process can gain privileges (NoNewPrivs: 1)",
    "capabilities-dropped": "no capability at all (CapEff, CapPrm, CapBnd, CapAmb are 0)",
    "network-none": "no network interface but lo",
    "read-only-rootfs": "the root filesystem is read-only",
    "non-root-user": "the task runs as the policy's non-root uid",
    "memory-limit": "the memory limit is set, and an allocation past it is OOM-killed",
    "pids-limit": "the pids limit is set, and a thread bomb stops at it",
    "cpu-limit": "the CFS quota in the task's cgroup is the policy's cpus (never unlimited)",
    "apparmor": "the task is confined by the AppArmor profile",
}


# -- findings ---------------------------------------------------------------------------


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in a bundle: the file, the rule, what is wrong."""

    rule: str
    file: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.file}: {self.message} [{self.rule}]"

    def as_json(self) -> dict[str, str]:
        return {
            "severity": self.severity.value,
            "rule": self.rule,
            "file": self.file,
            "message": self.message,
        }


# -- sandbox.toml schema ----------------------------------------------------------------


class FrozenModel(BaseModel):
    """Immutable, and an unknown key is an error: policy files are edited by people."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class IntBound(FrozenModel):
    default: int = Field(gt=0)
    ceiling: int = Field(gt=0)


class FloatBound(FrozenModel):
    default: float = Field(gt=0)
    ceiling: float = Field(gt=0)


class LimitsSection(FrozenModel):
    timeout_s: FloatBound
    memory_mb: IntBound
    cpus: FloatBound
    pids: IntBound
    tmpfs_mb: IntBound
    output_bytes: IntBound
    nofile: IntBound
    fsize_mb: IntBound
    nproc: IntBound
    code_bytes: IntBound

    def bounds(self) -> dict[str, IntBound | FloatBound]:
        return {name: getattr(self, name) for name in type(self).model_fields}


# One pip requirement of [image] python_packages: a name, extras, version clauses.
# Nothing else (no URL, path, marker or option): the string goes to pip on the host,
# so "--index-url=..." or "pkg @ https://..." must never be read as one.
_VERSION_CLAUSE = r"\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
PYTHON_REQUIREMENT = (
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?"
    rf"(?:{_VERSION_CLAUSE}(?:\s*,{_VERSION_CLAUSE})*)?$"
)


# A top-level module name, as [image] preload names one (no dots: a package is
# preloaded whole, as its own import statement loads it; no path, no option).
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"


class ImageVariant(FrozenModel):
    # The variant's third-party packages, instead of [image] python_packages (the same
    # base, agent and hardening; another set of wheels), pinned by its own lock.
    python_packages: tuple[Annotated[str, Field(pattern=PYTHON_REQUIREMENT)], ...] = Field(
        min_length=1
    )


class ImageSection(FrozenModel):
    repository: str = Field(pattern=r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$")
    uid: int = Field(ge=0, le=2**31 - 1)
    # Third-party packages installed in the task image, pinned by the bundle's
    # python-packages.lock (runner.sandbox.packages); empty: the standard library only.
    python_packages: tuple[Annotated[str, Field(pattern=PYTHON_REQUIREMENT)], ...] = ()
    # Top-level modules a warm pool slot's agent imports before it waits for its task
    # (the lock must provide each, external_allow must allow each: `policy lint`).
    preload: tuple[Annotated[str, Field(pattern=MODULE_NAME)], ...] = ()
    # Other task images a tenant profile may name (image_variant): by name, each with
    # its own packages and lock. Their containers are made as the default image's
    # (the same isolation, limits and self-check), only without a warm pool.
    variants: dict[Annotated[str, Field(pattern=VARIANT_NAME)], ImageVariant] = {}

    def packages_by_image(self) -> dict[str | None, tuple[str, ...]]:
        """Each task image's python_packages: the default image's (key None) first, then
        every variant's, by name (what is locked, built and hashed, in that order)."""
        found: dict[str | None, tuple[str, ...]] = {None: self.python_packages}
        return found | {name: v.python_packages for name, v in sorted(self.variants.items())}


class ImportsSection(FrozenModel):
    stdlib_allow: tuple[str, ...]
    stdlib_allow_ceiling: tuple[str, ...]
    external_allow: tuple[str, ...]
    external_allow_ceiling: tuple[str, ...]
    builtins_deny: tuple[str, ...]
    builtins_deny_floor: tuple[str, ...]


class MountEntry(FrozenModel):
    type: str
    source: str = ""
    target: str
    read_only: bool = False


class TmpfsEntry(FrozenModel):
    target: str
    options: str


class ContainerSection(FrozenModel):
    network_mode: str
    read_only_rootfs: bool
    privileged: bool
    cap_drop: tuple[str, ...]
    cap_add: tuple[str, ...]
    no_new_privileges: bool
    pid_mode: str
    ipc_mode: str
    cgroupns: str
    mounts: tuple[MountEntry, ...]
    devices: tuple[str, ...]
    tmpfs: Mapping[str, str]

    @field_validator("tmpfs")
    @classmethod
    def _freeze_tmpfs(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        return MappingProxyType(dict(value))


class SeccompSection(FrozenModel):
    profile: str


class AppArmorSection(FrozenModel):
    profile: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    file: str


class SelfCheckSection(FrozenModel):
    required: tuple[str, ...]
    optional: tuple[str, ...]
    canary_memory_mb: int = Field(ge=16)
    canary_pids: int = Field(ge=8)
    canary_timeout_s: float = Field(gt=0)


class PolicyConfig(FrozenModel):
    """``sandbox.toml``, validated."""

    version: Literal[1]
    limits: LimitsSection
    image: ImageSection
    imports: ImportsSection
    container: ContainerSection
    seccomp: SeccompSection
    apparmor: AppArmorSection
    selfcheck: SelfCheckSection


# -- [limits]: units, floors, and the Limits they make ----------------------------------


# Settings field -> (bound in [limits], factor to the Limits unit, Limits field).
LIMIT_FIELDS: tuple[tuple[str, str, int, str], ...] = (
    ("task_timeout_s", "timeout_s", 1, "timeout_s"),
    ("memory_mb", "memory_mb", MIB, "memory_bytes"),
    ("cpus", "cpus", 1, "cpus"),
    ("pids_limit", "pids", 1, "pids"),
    ("tmpfs_mb", "tmpfs_mb", MIB, "tmpfs_bytes"),
    ("output_bytes", "output_bytes", 1, "output_bytes"),
    ("nofile", "nofile", 1, "nofile"),
    ("fsize_mb", "fsize_mb", MIB, "fsize_bytes"),
    ("nproc", "nproc", 1, "nproc"),
    ("code_bytes", "code_bytes", 1, "code_bytes"),
)


def limit_minimum(bound_name: str) -> float | int:
    """The floor of a ``[limits]`` key, in the bundle's unit (MiB for ``*_mb``)."""
    for _, name, factor, limits_field in LIMIT_FIELDS:
        if name == bound_name:
            minimum: float | int = getattr(MINIMUM_LIMITS, limits_field)
            return minimum // factor if factor != 1 else minimum
    raise KeyError(bound_name)


def limits_of(section: LimitsSection, which: Literal["default", "ceiling"]) -> Limits:
    """The :class:`Limits` made of a ``[limits]`` section's defaults, or of its ceilings."""
    values: dict[str, Any] = {}
    for _, bound_name, factor, limits_field in LIMIT_FIELDS:
        value = getattr(getattr(section, bound_name), which)
        values[limits_field] = value * factor if factor != 1 else value
    return Limits(**values)


def format_number(value: object) -> str:
    """A limit as the messages write it: ``0.5``, ``1e-10``, ``512``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- [imports]: allowlists and their ceilings -------------------------------------------


def wider_than(allowed: frozenset[str], ceiling: frozenset[str]) -> list[str]:
    """The entries of ``allowed`` the ``ceiling`` does not cover (``*`` covers all)."""
    if "*" in ceiling:
        return []
    return sorted(allowed - ceiling)
