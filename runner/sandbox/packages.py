"""Third-party Python packages of the task image: the lock, the wheel cache, staging.

The policy bundle asks for packages (``[image] python_packages`` in ``sandbox.toml``,
pip requirement strings such as ``"numpy==2.*"``). This module owns what follows:

- **Resolving** them into a lock (:func:`resolve`), with pip *on the host* (its own
  index configuration; nothing inside an image build reaches a network): ``pip
  download`` of binary wheels only, for the image's interpreter
  (:data:`TARGET`: CPython 3.11, glibc 2.36, the host's architecture), dependencies
  included. No source distribution is ever built, so no build script of a package
  runs on the host.
- **The lock file** (:data:`LOCK_FILE`, in the bundle beside ``sandbox.toml``): a pip
  requirements file, ``name==version`` and the sha256 of the one wheel per package,
  with the wheel's file name and the modules it provides as comments. It is what the
  auditor reads and what pip installs from (``--require-hashes``), and it records the
  request it was made from (``request-sha256``): a lock that does not match the
  bundle's request is refused (:func:`load_lock`), never silently re-resolved.
- **The wheel cache** (:class:`WheelCache`, under the project's cache directory):
  every wheel downloaded once, checked against the lock's sha256 each time it is used.
- **Staging** (:func:`stage_packages`): the locked wheels installed into a folder by
  the host's pip (``--no-index --no-deps --require-hashes``, for the target
  platform), which the image build copies in read-only and compiles there. Neither
  pip nor the wheels end up in the image.

Standard library and the runner's errors only: no Docker (the image build in
:mod:`runner.sandbox.image` uses this), no settings.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigurationError, ImageBuildError

LOCK_FILE = "python-packages.lock"
# pip downloads can be slow (a large wheel on a slow mirror); a hung index is not.
PIP_TIMEOUT_S = 900


@dataclass(frozen=True, slots=True)
class Target:
    """The interpreter and platform the wheels are for: the task image's."""

    python_version: str  # "3.11"
    glibc: tuple[int, int]  # the image's C library; manylinux wheels up to it fit
    arch: str  # "x86_64", "aarch64"

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    @property
    def platforms(self) -> tuple[str, ...]:
        """Every manylinux tag the image can load, newest first.

        pip does not widen ``manylinux_2_36`` to the older ``manylinux_2_28`` on its
        own when asked for another platform than its own, so all of them are named.
        """
        major, newest = self.glibc
        tags = [f"manylinux_{major}_{minor}_{self.arch}" for minor in range(newest, 16, -1)]
        return (*tags, f"manylinux2014_{self.arch}")

    def describe(self) -> str:
        return f"{self.abi}-{self.abi}-manylinux_{self.glibc[0]}_{self.glibc[1]}_{self.arch}"

    def pip_options(self) -> list[str]:
        """pip's options for wheels of this target (binary only: no build runs here)."""
        options = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            self.python_version,
            "--abi",
            self.abi,
        ]
        for tag in self.platforms:
            options += ["--platform", tag]
        return options


def _host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


#: The bootstrapped base: Debian bookworm (python3 3.11, glibc 2.36), built by the
#: host's daemon for the host's architecture. A registry base
#: (``SANDBOX_BASE_IMAGE``) must have the same Python minor version; the build proves
#: every locked package imports, so a mismatch fails the build, not a task.
TARGET = Target(python_version="3.11", glibc=(2, 36), arch=_host_arch())


# -- the request ----------------------------------------------------------------------


def request_sha256(requested: Iterable[str], target: Target = TARGET) -> str:
    """What a lock was made from: the requirement strings (order ignored) and target."""
    text = "\n".join(["target " + target.describe(), *sorted(r.strip() for r in requested)])
    return hashlib.sha256(text.encode()).hexdigest()


# -- the lock -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockedWheel:
    """One pinned package: its one wheel, by name and sha256."""

    name: str  # the distribution, normalized (``python-dateutil``)
    version: str
    sha256: str
    filename: str
    provides: tuple[str, ...]  # top-level import names (``dateutil``)


@dataclass(frozen=True, slots=True)
class PackageLock:
    """A lock file, parsed; ``sha256`` is the file's own (part of the image tag)."""

    requested: tuple[str, ...]
    request_sha256: str
    target: str
    wheels: tuple[LockedWheel, ...]
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def provides(self) -> tuple[str, ...]:
        """Every top-level module the locked packages install, sorted."""
        return tuple(sorted({module for wheel in self.wheels for module in wheel.provides}))


_HEADER = """\
# {file}: the third-party packages of the task image, pinned.
#
# Written by `sandbox-runner image lock` from [image] python_packages in sandbox.toml;
# do not edit by hand: the image build refuses a lock whose request-sha256 does not
# match the bundle's request (re-run `sandbox-runner image lock` after editing it).
# pip installs exactly these wheels (--require-hashes --no-deps --no-index); each is
# named with the top-level modules it provides, which is what external_allow names.
#
# request: {request}
# target: {target}
# request-sha256: {request_sha256}
"""


def normalize_name(name: str) -> str:
    """PEP 503: ``Python_Dateutil`` -> ``python-dateutil``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def render_lock(requested: Sequence[str], wheels: Iterable[LockedWheel], target: Target) -> str:
    lines = [
        _HEADER.format(
            file=LOCK_FILE,
            request=", ".join(requested),
            target=target.describe(),
            request_sha256=request_sha256(requested, target),
        )
    ]
    for wheel in sorted(wheels, key=lambda w: w.name):
        lines.append(f"{wheel.name}=={wheel.version} \\")
        lines.append(f"    --hash=sha256:{wheel.sha256}")
        lines.append(f"    # wheel: {wheel.filename}")
        lines.append(f"    # provides: {', '.join(wheel.provides) or '(no module)'}")
    return "\n".join(lines) + "\n"


_REQUIREMENT = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)==(?P<version>[A-Za-z0-9.+!_-]+) \\$")
_HASH = re.compile(r"^\s+--hash=sha256:(?P<sha>[0-9a-f]{64})$")
_WHEEL = re.compile(r"^\s+# wheel: (?P<file>[A-Za-z0-9._+!-]+\.whl)$")
_PROVIDES = re.compile(r"^\s+# provides: (?P<modules>.*)$")
_META = re.compile(r"^# (?P<key>request|target|request-sha256): (?P<value>.*)$")


def parse_lock(text: str, where: str = LOCK_FILE) -> PackageLock:
    """A lock file's text, checked line by line; anything else is a ConfigurationError."""
    meta: dict[str, str] = {}
    wheels: list[LockedWheel] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip() or (line.startswith("#") and not _META.match(line)):
            index += 1
            continue
        if match := _META.match(line):
            meta[match["key"]] = match["value"].strip()
            index += 1
            continue
        block = [*lines[index : index + 4], "", "", "", ""][:4]
        requirement = _REQUIREMENT.match(block[0])
        hashed = _HASH.match(block[1])
        wheel = _WHEEL.match(block[2])
        provides = _PROVIDES.match(block[3])
        if requirement is None or hashed is None or wheel is None or provides is None:
            raise ConfigurationError(
                f"{where}: line {index + 1} is not part of a locked package",
                hint="the lock is written by `sandbox-runner image lock`; re-run it",
            )
        modules = provides["modules"].strip()
        wheels.append(
            LockedWheel(
                name=requirement["name"],
                version=requirement["version"],
                sha256=hashed["sha"],
                filename=wheel["file"],
                provides=()
                if modules == "(no module)"
                else tuple(m.strip() for m in modules.split(",")),
            )
        )
        index += 4
    missing = [key for key in ("request", "target", "request-sha256") if key not in meta]
    if missing:
        raise ConfigurationError(
            f"{where}: the header lacks {', '.join(missing)}",
            hint="the lock is written by `sandbox-runner image lock`; re-run it",
        )
    names = [wheel.name for wheel in wheels]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{where}: a package is locked twice")
    requested = tuple(part.strip() for part in meta["request"].split(",") if part.strip())
    return PackageLock(
        requested=requested,
        request_sha256=meta["request-sha256"],
        target=meta["target"],
        wheels=tuple(wheels),
        text=text,
    )


def load_lock(
    bundle_dir: Path,
    requested: Sequence[str],
    target: Target = TARGET,
    *,
    variant: str | None = None,
) -> PackageLock | None:
    """The bundle's lock for ``requested`` (None when no package is asked for);
    ``variant``: the lock of that ``[image.variants]`` image (:func:`lock_file`).

    A missing lock, or one made from another request or for another target, is a
    :class:`ConfigurationError` naming the file: the image is built from the lock
    alone, so it must say what the bundle asks for.
    """
    path = bundle_dir / lock_file(variant)
    where = str(path)
    section = "[image]" if variant is None else f"[image.variants.{variant}]"
    command = "sandbox-runner image lock"
    if not requested:
        if path.exists():
            raise ConfigurationError(
                f"{where}: a lock, but {section} python_packages asks for no package",
                hint=f"remove the lock, or run `{command}` after listing the packages",
            )
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"{where}: cannot read the lock of {section} python_packages ({exc.strerror})",
            hint=f"run `{command}` to resolve the packages into it",
        ) from exc
    lock = parse_lock(text, where)
    if lock.request_sha256 != request_sha256(requested, target) or lock.target != (
        target.describe()
    ):
        raise ConfigurationError(
            f"{where} was made for another request or target than the bundle's "
            f"{section} python_packages ({', '.join(requested)}; {target.describe()})",
            hint=f"run `{command}` and review the lock's diff",
        )
    return lock


def lock_file(variant: str | None = None) -> str:
    """The lock's file name in the bundle: :data:`LOCK_FILE` for the default image,
    ``python-packages.<variant>.lock`` for an ``[image.variants]`` image (the policy's
    :func:`runner.policy.model.variant_lock_file`; a test pins that both agree)."""
    return LOCK_FILE if variant is None else f"python-packages.{variant}.lock"


# -- wheels ---------------------------------------------------------------------------

_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wheel_provides(path: Path) -> tuple[str, ...]:
    """The top-level modules a wheel installs: packages, modules, extension modules.

    Read from the archive's names (its metadata may lie; the files are what lands):
    a folder with Python files (a package, or a namespace package), a ``.py``
    file, a ``.so`` extension module at the top. ``*.dist-info``, ``*.data`` and
    folders of bundled libraries (``numpy.libs``) are not modules.
    """
    modules: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            first, slash, rest = name.partition("/")
            if slash:
                if "." not in first and rest.endswith((".py", ".so")):
                    modules.add(first)
            elif name.endswith(".py"):
                modules.add(name[:-3])
            elif name.endswith(".so"):
                modules.add(name.split(".", 1)[0])
    return tuple(sorted(modules))


def locked_wheel(path: Path) -> LockedWheel:
    match = _WHEEL_NAME.match(path.name)
    if match is None:
        raise ImageBuildError(f"{path.name} is not a wheel file name")
    return LockedWheel(
        name=normalize_name(match["name"]),
        version=match["version"],
        sha256=file_sha256(path),
        filename=path.name,
        provides=wheel_provides(path),
    )


Progress = Callable[[str], None]


def _pip(python: str, arguments: list[str], what: str) -> None:
    command = [python, "-m", "pip", *arguments]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=PIP_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"pip {what} failed", hint=str(exc)) from exc
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if line.strip()][-4:]
        raise ImageBuildError(
            f"pip {what} failed with exit code {result.returncode}", hint=" | ".join(tail)
        )


_COMMON = ["--disable-pip-version-check", "--no-input", "--quiet"]


def resolve(
    requested: Sequence[str],
    progress: Progress,
    *,
    cache: WheelCache,
    target: Target = TARGET,
    python: str = sys.executable,
) -> str:
    """Resolve ``requested`` with the host's pip into wheels; return the lock's text.

    The wheels land in ``cache`` too, so the next build does not download them again.
    """
    progress(f"resolving {', '.join(requested)} for {target.describe()} with pip")
    with tempfile.TemporaryDirectory(prefix="sandbox-runner-lock-") as tmp:
        dest = Path(tmp)
        # "--": an entry is never read as an option (the policy model refuses those too).
        _pip(
            python,
            ["download", *_COMMON, *target.pip_options(), "--dest", tmp, "--", *requested],
            "download",
        )
        wheels = [locked_wheel(path) for path in sorted(dest.glob("*.whl"))]
        for path in dest.glob("*.whl"):
            cache.put(path)
    progress(f"locked {len(wheels)} wheels: " + ", ".join(f"{w.name}=={w.version}" for w in wheels))
    return render_lock(list(requested), wheels, target)


class WheelCache:
    """Wheels by file name in one folder; every use checks the lock's sha256."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, wheel: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / wheel.name
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(wheel, partial)
        os.replace(partial, target)  # never a half-written wheel under its name

    def missing(self, lock: PackageLock) -> list[LockedWheel]:
        """The locked wheels not here, or here with another sha256 (those are removed)."""
        absent = []
        for wheel in lock.wheels:
            path = self.directory / wheel.filename
            if path.is_file() and file_sha256(path) == wheel.sha256:
                continue
            path.unlink(missing_ok=True)
            absent.append(wheel)
        return absent

    def ensure(
        self,
        lock: PackageLock,
        progress: Progress,
        *,
        target: Target = TARGET,
        python: str = sys.executable,
    ) -> None:
        """Every wheel of ``lock`` here with its sha256: downloads only what is missing."""
        absent = self.missing(lock)
        if not absent:
            progress(f"{len(lock.wheels)} locked wheels in the cache ({self.directory})")
            return
        progress(f"downloading {len(absent)} locked wheels with pip (hashes checked)")
        with tempfile.TemporaryDirectory(prefix="sandbox-runner-wheels-") as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text(render_lock(lock.requested, absent, target), encoding="utf-8")
            dest = Path(tmp) / "wheels"
            _pip(
                python,
                [
                    "download",
                    *_COMMON,
                    *target.pip_options(),
                    "--no-deps",
                    "--require-hashes",
                    "--dest",
                    str(dest),
                    "--requirement",
                    str(requirements),
                ],
                "download",
            )
            for wheel in absent:
                path = dest / wheel.filename
                if not path.is_file() or file_sha256(path) != wheel.sha256:
                    raise ImageBuildError(
                        f"pip did not download {wheel.filename} with the locked sha256",
                        hint="the index serves another file for this version; re-lock",
                    )
                self.put(path)
        still = self.missing(lock)
        if still:
            raise ImageBuildError(f"wheels missing from the cache: {still[0].filename}")


def stage_packages(
    lock: PackageLock,
    cache: WheelCache,
    dest: Path,
    progress: Progress,
    *,
    target: Target = TARGET,
    python: str = sys.executable,
) -> None:
    """Install the locked wheels into ``dest`` (a folder for the image), offline.

    The host's pip does the unpacking (it knows the wheel format: ``.data`` folders,
    ``RECORD``), for the target's platform, from the cache alone (``--no-index``),
    every hash checked, no dependency added (``--no-deps``: the lock is complete).
    Nothing is compiled here (the image compiles with its own interpreter), and
    console scripts are dropped: their first line names the host's Python, and
    tasks run no programs of their own.
    """
    cache.ensure(lock, progress, target=target, python=python)
    progress(f"staging {len(lock.wheels)} locked wheels for the image")
    with tempfile.TemporaryDirectory(prefix="sandbox-runner-lock-") as tmp:
        requirements = Path(tmp) / LOCK_FILE
        requirements.write_text(lock.text, encoding="utf-8")
        _pip(
            python,
            [
                "install",
                *_COMMON,
                *target.pip_options(),
                "--no-index",
                "--no-deps",
                "--require-hashes",
                "--no-compile",
                "--no-warn-script-location",
                "--find-links",
                str(cache.directory),
                "--target",
                str(dest),
                "--requirement",
                str(requirements),
            ],
            "install (staging the locked wheels)",
        )
    shutil.rmtree(dest / "bin", ignore_errors=True)


def default_wheel_cache() -> WheelCache:
    """``$XDG_CACHE_HOME/sandbox-runner/wheels``, else ``~/.cache/sandbox-runner/wheels``
    (beside the self-check's cache; read when called)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return WheelCache(Path(base) / "sandbox-runner" / "wheels")


__all__ = [
    "LOCK_FILE",
    "TARGET",
    "LockedWheel",
    "PackageLock",
    "Target",
    "WheelCache",
    "default_wheel_cache",
    "load_lock",
    "parse_lock",
    "render_lock",
    "request_sha256",
    "resolve",
    "stage_packages",
]
