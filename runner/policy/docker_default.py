"""Docker's default seccomp profile, and how ours differs from it, call by call.

Owns: the reference copy of Docker's default profile
(``policies/reference/docker-default-seccomp.json``) and its loading, and
:func:`compare_with_docker`: both profiles resolved as Docker would for one
architecture with no capabilities, runc's ENOSYS stub for calls newer than any a
profile names included.

Must not import: the bundle, lint, explain or effective modules of this package (it
compares profiles, not bundles), docker or the sandbox implementations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ConfigurationError
from runner.policy.seccomp import (
    ENOSYS,
    REFERENCE_DIR,
    SeccompProfile,
    SyscallVerdict,
    syscall_table,
)

DOCKER_DEFAULT_PROFILE = REFERENCE_DIR / "docker-default-seccomp.json"


def docker_default_profile(path: Path = DOCKER_DEFAULT_PROFILE) -> SeccompProfile:
    try:
        return SeccompProfile.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"Cannot read Docker's default profile {path}", hint=str(exc)
        ) from exc


@dataclass(frozen=True, slots=True)
class SyscallDifference:
    name: str
    ours: str
    docker: str
    ours_conditions: tuple[str, ...] = ()  # when ours allows it only with arguments

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"syscall": self.name, "ours": self.ours, "docker": self.docker}
        if self.ours_conditions:
            document["oursOnlyIf"] = list(self.ours_conditions)
        return document


@dataclass(frozen=True, slots=True)
class DockerComparison:
    """How our profile differs from Docker's default, system call by system call."""

    arch: str
    ours_allowed: int
    docker_allowed: int
    refused_only_by_ours: tuple[SyscallDifference, ...]
    narrowed_by_ours: tuple[SyscallDifference, ...]
    allowed_only_by_ours: tuple[SyscallDifference, ...]
    errno_differs: tuple[SyscallDifference, ...]
    docker_names_not_on_arch: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "capabilities": [],
            "oursAllowed": self.ours_allowed,
            "dockerAllowed": self.docker_allowed,
            "refusedOnlyByOurs": [d.as_json() for d in self.refused_only_by_ours],
            "narrowedByOurs": [d.as_json() for d in self.narrowed_by_ours],
            "allowedOnlyByOurs": [d.as_json() for d in self.allowed_only_by_ours],
            "errnoDiffers": [d.as_json() for d in self.errno_differs],
            "dockerNamesNotOnArch": list(self.docker_names_not_on_arch),
        }


def compare_with_docker(
    ours: SeccompProfile, docker: SeccompProfile, arch: str
) -> DockerComparison:
    """Both profiles resolved as Docker would for ``arch`` with no capabilities."""
    names_on_arch = set(syscall_table().get(arch, {}))
    our_map, docker_map = ours.resolve(arch), docker.resolve(arch)
    mentioned = set(our_map) | set(docker_map)
    if names_on_arch:
        not_on_arch = sorted(name for name in docker_map if name not in names_on_arch)
        mentioned &= names_on_arch
    else:
        not_on_arch = []
    numbers = syscall_table().get(arch, {})
    refused, narrowed, added, errnos = [], [], [], []
    ours_allowed = docker_allowed = 0
    for name in sorted(mentioned):
        mine = our_map.get(name) or _unlisted(ours, our_map, name, numbers)
        theirs = docker_map.get(name) or _unlisted(docker, docker_map, name, numbers)
        ours_allowed += mine.is_allowed
        docker_allowed += theirs.is_allowed
        difference = SyscallDifference(name, mine.describe(), theirs.describe(), mine.conditions)
        if theirs.is_allowed and not mine.is_allowed:
            refused.append(difference)
        elif mine.is_allowed and not theirs.is_allowed:
            added.append(difference)
        elif mine.is_allowed and theirs.is_allowed:
            if mine.kind != theirs.kind or mine.conditions != theirs.conditions:
                narrowed.append(difference)
        elif (mine.kind, mine.errno) != (theirs.kind, theirs.errno):
            errnos.append(difference)
    return DockerComparison(
        arch=arch,
        ours_allowed=ours_allowed,
        docker_allowed=docker_allowed,
        refused_only_by_ours=tuple(refused),
        narrowed_by_ours=tuple(narrowed),
        allowed_only_by_ours=tuple(added),
        errno_differs=tuple(errnos),
        docker_names_not_on_arch=tuple(not_on_arch),
    )


def _unlisted(
    profile: SeccompProfile,
    listed: Mapping[str, SyscallVerdict],
    name: str,
    numbers: Mapping[str, int],
) -> SyscallVerdict:
    """A call the profile does not name: its default action, except runc's ENOSYS stub.

    runc answers ENOSYS for any call numbered above the highest one the profile names
    (so that a newer libc falls back); policies/README.md section 1.2.
    """
    highest = max((numbers[n] for n in listed if n in numbers), default=-1)
    if numbers.get(name, -1) > highest >= 0:
        return SyscallVerdict(name, "errno", ENOSYS, comments=("runc's ENOSYS stub",))
    return profile.default_verdict(name)
