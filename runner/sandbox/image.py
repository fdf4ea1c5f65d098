"""The task image: built from Debian packages, no registry needed.

Two layers:

1. **Base image.** With ``base_image`` set (any ordinary registry image with
   python3 and apt, e.g. ``debian:bookworm-slim``) that image is used as is.
   Otherwise a minimal Debian root filesystem is bootstrapped from the host's own
   apt mirror (``debootstrap --variant=minbase``, python3 and tini included) and
   turned into an image with ``docker import``. The mirror is read from the host's
   apt sources at run time, never written down here. A mirror URI with credentials
   (``https://user:pass@mirror/debian``) is split: debootstrap gets the URI without
   them (so the image's ``sources.list``, apt lists and logs never hold them) and
   wget, which does its downloads, reads them from a private wgetrc outside the root
   filesystem; build output is redacted, and the finished root filesystem is searched
   for them before it becomes an image.
2. **Task image.** ``sandbox_image/Dockerfile`` on top of the base: tini, the
   agent (with the analyzer core copied in), the bundle's locked Python packages
   (:mod:`runner.sandbox.packages`: installed into a folder on the host from cached,
   hash-checked wheels, copied in read-only, compiled by the image's interpreter), a
   dedicated non-root user, no setuid/setgid bits, labels. Its tag is a hash of every
   input (Dockerfile, agent files, base image id, build arguments, the package lock),
   so it is rebuilt only when one changes: an unchanged lock downloads nothing.

Progress (debootstrap and build output) is reported through a callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import docker
import docker.errors

from runner.errors import ImageBuildError
from runner.sandbox.bundle import agent_sources, hash_files
from runner.sandbox.docker_errors import DOCKER_FAULTS, docker_errors
from runner.sandbox.packages import PackageLock, default_wheel_cache, stage_packages

TASK_REPOSITORY = "sandbox-runner-task"
BASE_REPOSITORY = "sandbox-runner-base"
SANDBOX_UID = 10001
BOOTSTRAP_PACKAGES = ("python3", "tini")
# Left out of the bootstrapped base: package caches, docs, manuals, translations.
BOOTSTRAP_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))

Progress = Callable[[str], None]
_QUIET_PREFIXES = (
    "I: Retrieving",
    "I: Validating",
    "I: Extracting",
    "I: Unpacking",
    "I: Configuring",
)


@dataclass(frozen=True, slots=True)
class ImageRecipe:
    """Everything that decides what the task image contains."""

    image_dir: Path
    base_image: str | None
    debian_suite: str
    debian_mirror: str | None
    # From the policy bundle's [image] section (policies/sandbox.toml).
    repository: str = TASK_REPOSITORY
    uid: int = SANDBOX_UID
    # The bundle's package lock ([image] python_packages), None for the standard
    # library alone.
    packages: PackageLock | None = None

    @property
    def base_tag(self) -> str:
        if self.base_image:
            return self.base_image
        recipe = f"{self.debian_suite}:{','.join(BOOTSTRAP_PACKAGES)}:{BOOTSTRAP_PRUNE}"
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
        return f"{BASE_REPOSITORY}:{self.debian_suite}-{digest}"

    def build_files(self) -> dict[str, Path]:
        files = {"Dockerfile": self.image_dir / "Dockerfile"}
        files.update(
            {f"agent/{name}": path for name, path in agent_sources(self.image_dir).items()}
        )
        return files

    def task_tag(self, base_id: str) -> str:
        inputs = f"base={base_id};uid={self.uid}"
        if self.packages is not None:
            # The lock's own hash: the same lock, the same image, nothing downloaded.
            inputs += f";packages={self.packages.sha256}"
        digest = hashlib.sha256(f"{inputs}\n".encode())
        return f"{self.repository}:{hash_files(self.build_files(), digest)[:16]}"


def debian_mirror_from_apt(sources: tuple[Path, ...] = APT_SOURCES) -> str | None:
    """The host's Debian mirror: first ``URIs:`` (deb822) or ``deb URL`` line for Debian."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files.extend(sorted(source.glob("*.sources")) + sorted(source.glob("*.list")))
        elif source.is_file():
            files.append(source)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            uri = match.group(1) or match.group(2)
            if "security" not in uri and "/debian" in uri:
                return uri
    return None


@dataclass(frozen=True, slots=True)
class MirrorAccess:
    """A mirror URI split into what may be written down and what may not."""

    uri: str  # without credentials: what debootstrap (and so the image) gets
    username: str | None = None
    password: str | None = None
    userinfo: str | None = None  # ``user:pass`` as the URI spelled it (percent-encoded)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings never to show in build output (longest first: none leaves a tail)."""
        found = {self.userinfo or "", self.password or ""}
        if self.password:
            found.add(urllib.parse.quote(self.password, safe=""))
        return tuple(sorted(found - {""}, key=len, reverse=True))

    @property
    def leak_markers(self) -> tuple[str, ...]:
        """What a file of the image holding the credentials would contain.

        The URI's ``user:pass@`` (how a sources.list or apt list name would carry it)
        and a password long enough not to turn up in binaries by chance.
        """
        markers = {f"{self.userinfo}@"} if self.userinfo else set()
        if self.password and len(self.password) >= 8:
            markers.add(self.password)
        return tuple(sorted(markers))

    def wgetrc(self) -> str | None:
        """wget's settings carrying the credentials (None when there are none)."""
        if self.username is None and self.password is None:
            return None
        lines = []
        if self.username is not None:
            lines.append(f"user = {self.username}")
        if self.password is not None:
            lines.append(f"password = {self.password}")
        return "\n".join(lines) + "\n"


def mirror_access(mirror: str) -> MirrorAccess:
    """Split ``scheme://user:pass@host/path`` into the bare URI and the credentials."""
    parts = urllib.parse.urlsplit(mirror)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return MirrorAccess(mirror)
    username, colon, password = userinfo.partition(":")
    access = MirrorAccess(
        urllib.parse.urlunsplit(parts._replace(netloc=host)),
        urllib.parse.unquote(username),
        urllib.parse.unquote(password) if colon else None,
        userinfo,
    )
    for secret in (access.username, access.password):
        # One setting per line in a wgetrc: a line break would end it (and start another).
        if secret and any(char in secret for char in "\r\n"):
            raise ImageBuildError(
                "The Debian mirror's credentials contain a line break",
                hint="set SANDBOX_DEBIAN_MIRROR to a URI without one",
            )
    return access


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def bootstrap_command(debootstrap: str, suite: str, root: Path, access: MirrorAccess) -> list[str]:
    """The debootstrap command line: the mirror without its credentials."""
    return [
        debootstrap,
        "--variant=minbase",
        f"--include={','.join(BOOTSTRAP_PACKAGES)}",
        suite,
        str(root),
        access.uri,
    ]


def files_holding(root: Path, secrets: Iterable[str]) -> list[str]:
    """Paths under ``root`` (relative) whose name or content holds one of ``secrets``."""
    needles = [secret.encode() for secret in secrets if secret]
    if not needles:
        return []
    found = []
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if any(needle in relative.encode() for needle in needles):
            found.append(relative)
            continue
        if path.is_symlink() or not path.is_file():
            continue
        try:
            content = path.read_bytes()
        except OSError:
            continue
        if any(needle in content for needle in needles):
            found.append(relative)
    return found


def docker_build(
    client: docker.DockerClient,
    context: IO[bytes],
    tag: str,
    *,
    what: str,
    network: bool,
    buildargs: dict[str, str],
    progress: Progress,
) -> None:
    """``docker build`` of a tar context, its output streamed to ``progress``.

    The tag's suffix is the inputs hash: it goes in as ``INPUTS_HASH`` and as a label.
    A failed step raises :class:`ImageBuildError` with the last lines of the build.
    """
    inputs_hash = tag.partition(":")[2]
    try:
        stream = client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
            network_mode=None if network else "none",
            buildargs={**buildargs, "INPUTS_HASH": inputs_hash},
            labels={"io.sandbox-runner.inputs-hash": inputs_hash},
        )
        tail: list[str] = []
        for event in stream:
            if "error" in event:
                raise ImageBuildError(
                    f"docker build of {what} failed",
                    hint=" | ".join([*tail[-3:], str(event["error"]).strip()]),
                )
            text = str(event.get("stream", "")).strip()
            if text:
                tail = [*tail[-10:], text]
                progress(text)
    except DOCKER_FAULTS as exc:
        raise ImageBuildError(f"docker build of {what} failed", hint=str(exc)) from exc


class ImageBuilder:
    """Builds (only when needed) and names the task image."""

    def __init__(self, client: docker.DockerClient, recipe: ImageRecipe, progress: Progress):
        self._client = client
        self._recipe = recipe
        self._progress = progress

    def ensure(self) -> str:
        """Return the task image's tag, building the base and the image if missing."""
        base_id = self._ensure_base()
        tag = self._recipe.task_tag(base_id)
        if self._exists(tag):
            return tag
        self._build_task_image(tag)
        return tag

    @property
    def base_tag(self) -> str:
        return self._recipe.base_tag

    def ensure_base(self) -> str:
        """The base image's id, bootstrapping (or pulling) it when missing.

        The runner image (:mod:`runner.runner_image`) is built on the same base.
        """
        return self._ensure_base()

    def image_id(self, tag: str) -> str | None:
        """The id of ``tag``, or None when it does not exist (yet)."""
        with contextlib.suppress(*DOCKER_FAULTS):
            return str(self._client.images.get(tag).id)
        return None

    def current_tag(self) -> str | None:
        """The tag the current inputs map to, if its base exists (no building)."""
        with docker_errors("Cannot inspect the base image", into=ImageBuildError):
            try:
                base = self._client.images.get(self._recipe.base_tag)
            except docker.errors.ImageNotFound:
                return None
        return self._recipe.task_tag(str(base.id))

    def _exists(self, tag: str) -> bool:
        with docker_errors("Cannot inspect images", into=ImageBuildError):
            try:
                self._client.images.get(tag)
            except docker.errors.ImageNotFound:
                return False
        return True

    def _ensure_base(self) -> str:
        tag = self._recipe.base_tag
        with docker_errors("Cannot inspect the base image", into=ImageBuildError):
            try:
                return str(self._client.images.get(tag).id)
            except docker.errors.ImageNotFound:
                pass
        if self._recipe.base_image:
            self._progress(f"pulling base image {tag}")
            try:
                return str(self._client.images.pull(tag).id)
            except DOCKER_FAULTS as exc:
                raise ImageBuildError(
                    f"Base image {tag} is not available", hint=f"pull failed: {exc}"
                ) from exc
        return self._bootstrap_base(tag)

    def _bootstrap_base(self, tag: str) -> str:
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None or os.geteuid() != 0:
            raise ImageBuildError(
                "Cannot bootstrap the Debian base image",
                hint="needs root and the debootstrap package (apt-get install debootstrap), "
                "or set SANDBOX_BASE_IMAGE to a registry image with python3",
            )
        mirror = self._recipe.debian_mirror or debian_mirror_from_apt()
        if mirror is None:
            raise ImageBuildError(
                "No Debian mirror found in the host's apt sources",
                hint="set SANDBOX_DEBIAN_MIRROR",
            )
        access = mirror_access(mirror)
        suite = self._recipe.debian_suite
        self._progress(f"bootstrapping a minimal Debian {suite} root filesystem (takes ~1 min)")
        with tempfile.TemporaryDirectory(prefix="sandbox-base-") as tmp:
            root = Path(tmp) / "root"
            env = None
            wgetrc = access.wgetrc()
            if wgetrc is not None:
                # Beside the root filesystem, never in it; readable by root only.
                rc_path = Path(tmp) / "wgetrc"
                rc_path.touch(mode=0o600)
                rc_path.write_text(wgetrc, encoding="utf-8")
                env = {**os.environ, "WGETRC": str(rc_path)}
            self._stream_command(
                bootstrap_command(debootstrap, suite, root, access), env, access.secrets
            )
            for relative in BOOTSTRAP_PRUNE:
                target = root / relative
                if target.is_dir():
                    shutil.rmtree(target)
                    target.mkdir(parents=True)
            leaked = files_holding(root, access.leak_markers)
            if leaked:
                raise ImageBuildError(
                    "The bootstrapped root filesystem holds the Debian mirror's credentials",
                    hint=f"in {', '.join(leaked[:5])}; no image was made",
                )
            self._progress(f"importing the root filesystem as {tag}")
            archive = Path(tmp) / "rootfs.tar"
            self._stream_command(
                ["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive), "."]
            )
            repository, _, version = tag.partition(":")
            try:
                self._client.api.import_image_from_file(
                    str(archive),
                    repository=repository,
                    tag=version,
                    changes=[
                        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "ENV LANG=C.UTF-8",
                    ],
                )
                return str(self._client.images.get(tag).id)
            except DOCKER_FAULTS as exc:
                raise ImageBuildError(
                    "docker import of the base image failed", hint=str(exc)
                ) from exc

    def _stream_command(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        """Run ``command``, its output to the progress callback (``secrets`` redacted)."""
        secrets = tuple(secrets)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as process:
            assert process.stdout is not None
            tail: list[str] = []
            for raw in process.stdout:
                line = redact(raw.rstrip(), secrets)
                tail = [*tail[-20:], line]
                if line.startswith(_QUIET_PREFIXES):
                    continue  # one line per package; the phases show progress well enough
                self._progress(line)
        if process.returncode != 0:
            raise ImageBuildError(
                f"{Path(command[0]).name} failed with exit code {process.returncode}",
                hint=" | ".join(tail[-5:]),
            )

    def _build_task_image(self, tag: str) -> None:
        self._progress(f"building task image {tag} on {self._recipe.base_tag}")
        lock = self._recipe.packages
        with tempfile.TemporaryDirectory(prefix="sandbox-task-image-") as tmp:
            staged = Path(tmp) / "packages"
            staged.mkdir()
            if lock is not None:
                stage_packages(lock, default_wheel_cache(), staged, self._progress)
            # On disk, not in memory: with packages the context is ~100 MB.
            with open(Path(tmp) / "context.tar", "w+b") as context:
                with tarfile.open(fileobj=context, mode="w") as tar:
                    for name, path in sorted(self._recipe.build_files().items()):
                        tar.add(path, arcname=name)
                    # The folder itself too: COPY packages/ needs it, even empty.
                    tar.add(staged, arcname="packages", filter=_read_only)
                context.seek(0)
                imports = " ".join(lock.provides) if lock is not None else ""
                docker_build(
                    self._client,
                    context,
                    tag,
                    what="the task image",
                    # The bootstrapped base has everything: the build needs no network
                    # (and works while the daemon's default bridge is down); a registry
                    # base may need apt for tini. Packages come staged, never from an
                    # index inside the build.
                    network=bool(self._recipe.base_image),
                    buildargs={
                        "BASE_IMAGE": self._recipe.base_tag,
                        "SANDBOX_UID": str(self._recipe.uid),
                        "PACKAGE_IMPORTS": imports,
                        "PACKAGE_LOCK_SHA256": lock.sha256 if lock is not None else "",
                    },
                    progress=self._progress,
                )


def _read_only(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A staged package file as the image gets it: root's, nobody else may write it,
    no setuid, setgid or sticky bit (COPY keeps a context's modes)."""
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    executable = member.isdir() or member.mode & 0o111
    member.mode = 0o755 if executable else 0o644
    return member
