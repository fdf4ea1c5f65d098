"""The task image as a read-only root filesystem on the host, shared by every task.

Owns: unpacking the task image (still built with Docker) once per image id into a
directory of the runner's state directory (``rootfs/<image id>``), with the image's
command, environment and working directory beside it; hardening it on the way in
(no setuid or setgid bit, no file or directory writable by anyone but root: a
writable directory in a shared root would be a channel between tenants, even though
every container also mounts it read-only); checking that nothing in it belongs to
the task user; a variant for gVisor, whose loader must read the binaries it runs
(the image makes tini execute-only, which Linux honours and gVisor cannot exec);
and removing the directories of images no container uses any more: a runner holds a
shared ``flock`` lease on each root it uses (``<root>.lease``, dropped by the kernel
when the runner dies), and a prune removes only a root that no container's bundle
names and whose lease it can take exclusively.

Unpacking is atomic (into a directory of this process's own, then renamed), so two
runners unpacking the same image at once each finish their own copy and one wins,
and a runner killed half-way leaves a ``.partial-<pid>-...`` directory that a later
unpack removes once that process is gone, never a half root filesystem in use.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import io
import json
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from runner.errors import ImageBuildError
from runner.sandbox.docker_errors import DOCKER_FAULTS, docker_errors
from runner.sandbox.spec import ImageConfig

PARTIAL = ".partial"
LEASE = ".lease"
# Part of every unpacked root's name: a change in how a root is prepared (hardening,
# mount points) unpacks every image again instead of reusing an old directory.
FORMAT = 2
GVISOR = "gvisor"
# Directories every container mounts its own tmpfs on, with the mode the tmpfs gets.
MOUNT_POINTS = {"tmp": 0o1777}
# The image's init: execute-only (0711) under Linux, readable for gVisor's loader.
TINI_PATHS = ("usr/bin/tini", "usr/bin/tini-static", "sbin/tini")


@dataclass(frozen=True, slots=True)
class Rootfs:
    """An unpacked image: where its root is, which image it is, how to run it."""

    path: Path
    image_id: str
    image: ImageConfig


class _Chunks(io.RawIOBase):
    """A stream of byte chunks (docker-py's ``export``) as a file for tarfile."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Unpack ``archive`` into ``dest`` by the rules of tarfile's ``"tar"`` filter
    (PEP 706): no path outside ``dest`` (written through a symlink or not, leading
    ``/`` stripped), and no setuid/setgid/sticky bit or group/other write bit survives.

    The filter is the standard library's where it has one (3.12, and the 3.11.4+
    backport); Debian bookworm's Python 3.11.2, the runner image's, has none, and gets
    the same rules from :func:`tar_filtered`. Hard links must point inside too.
    """
    if hasattr(tarfile, "tar_filter"):
        archive.extractall(dest, numeric_owner=True, filter="tar")
    else:  # pragma: no cover - exercised where the interpreter lacks the filter
        # S202: every member passes tar_filtered first, which is the filter.
        archive.extractall(  # noqa: S202
            dest, members=tar_filtered(archive, dest), numeric_owner=True
        )


def tar_filtered(members: Iterable[tarfile.TarInfo], dest: Path) -> Iterator[tarfile.TarInfo]:
    """``members`` checked and cleaned one by one, as they are extracted (a lazy
    generator: each check sees the symlinks extracted before it), by the ``"tar"``
    filter's rules; raises :class:`tarfile.TarError` for a member that would escape."""
    root = os.path.realpath(dest)

    def inside(relative: str) -> bool:
        target = os.path.realpath(os.path.join(root, relative))
        return os.path.commonpath([target, root]) == root

    for member in members:
        name = member.name.lstrip("/")
        if os.path.isabs(name) or not inside(name):
            raise tarfile.TarError(f"{member.name!r} would be extracted outside {dest}")
        if member.islnk() and not inside(member.linkname.lstrip("/")):
            raise tarfile.TarError(f"{member.name!r} is a hard link outside {dest}")
        cleaned = copy.copy(member)
        cleaned.name = name
        if member.islnk():
            # tarfile joins a hard link's target to dest: an absolute one would not be.
            cleaned.linkname = member.linkname.lstrip("/")
        cleaned.mode = member.mode & 0o755
        yield cleaned


def image_config(attrs: dict[str, Any]) -> ImageConfig:
    """How the image says to run it (``docker inspect``'s ``Config``)."""
    config = attrs.get("Config") or {}
    args = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    return ImageConfig(
        args=tuple(args), env=tuple(config.get("Env") or []), cwd=config.get("WorkingDir") or "/"
    )


class RootfsStore:
    """Unpacked task images under ``directory`` (the runner's state directory)."""

    def __init__(self, directory: Path, client: docker.DockerClient, *, task_uid: int) -> None:
        self.directory = directory
        self._client = client
        self._task_uid = task_uid
        # Our leases: a shared flock on ``<root>.lease`` for every root this process
        # uses. The kernel drops them when the process dies, however it dies.
        self._leases: dict[Path, int] = {}

    def ensure(self, image: str, *, variant: str | None = None) -> Rootfs:
        """The root filesystem of ``image`` (unpacked now if this image id is new),
        leased by this process until :meth:`release` (a prune leaves it alone)."""
        attrs = self._inspect(image)
        image_id = str(attrs["Id"])
        target = self._path(image_id, variant)
        config = image_config(attrs)
        while True:
            if not target.is_dir():
                self._unpack(image, target, variant)
            if self._lease(target):
                break
            # A prune removed it between our look and our lease: unpack it again.
        return Rootfs(path=target, image_id=image_id, image=config)

    def path_for(self, image: str, *, variant: str | None = None) -> Path:
        """Where ``image``'s root is (or would be), without unpacking it."""
        return self._path(str(self._inspect(image)["Id"]), variant)

    def _inspect(self, image: str) -> dict[str, Any]:
        with docker_errors(f"Cannot inspect the task image {image}", into=ImageBuildError):
            attrs: dict[str, Any] = self._client.api.inspect_image(image)  # type: ignore[no-untyped-call]
        return attrs

    def _path(self, image_id: str, variant: str | None) -> Path:
        name = f"v{FORMAT}-" + image_id.removeprefix("sha256:")[:16]
        return self.directory / (name + (f"-{variant}" if variant else ""))

    def _lease(self, target: Path) -> bool:
        """Hold a shared lease on ``target``; False when it is gone once we hold it."""
        if target in self._leases:
            return target.is_dir()
        fd = os.open(_lease_file(target), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a prune holds it exclusively
        if not target.is_dir():
            os.close(fd)
            return False
        self._leases[target] = fd
        return True

    def release(self, keep: Iterable[Path] = ()) -> None:
        """Drop our leases but on ``keep`` (every one when empty: the sandbox closes)."""
        kept = set(keep)
        for path in [path for path in self._leases if path not in kept]:
            os.close(self._leases.pop(path))

    def _unpack(self, image: str, target: Path, variant: str | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._remove_stale_partials()
        # Ours alone: another runner may be unpacking the same image right now.
        partial = target.with_name(f"{target.name}{PARTIAL}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        partial.mkdir()
        api = self._client.api
        with docker_errors(f"Cannot unpack the task image {image}", into=ImageBuildError):
            created = api.create_container(image, command=["true"], network_disabled=True)
            try:
                stream = _Chunks(iter(api.export(created["Id"])))
                with tarfile.open(fileobj=stream, mode="r|") as archive:
                    extract(archive, partial)
            except tarfile.TarError as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise ImageBuildError(
                    f"Cannot unpack the task image {image}", hint=f"its export: {exc}"
                ) from exc
            finally:
                with contextlib.suppress(*DOCKER_FAULTS):
                    api.remove_container(created["Id"], force=True)
        for relative, mode in MOUNT_POINTS.items():
            # runc gives a tmpfs the mode of the directory it is mounted on: /tmp keeps
            # the image's 1777 (every container mounts its own tmpfs there; the shared
            # root under it is read-only).
            point = partial / relative
            if point.is_dir():
                point.chmod(mode)
        if variant == GVISOR:
            for relative in TINI_PATHS:
                tini = partial / relative
                if tini.is_file() and not tini.is_symlink():
                    tini.chmod(0o755)
        problems = self.check(partial)
        if problems:
            shutil.rmtree(partial, ignore_errors=True)
            raise ImageBuildError(
                f"The task image {image} is not fit to be a shared root filesystem",
                hint="; ".join(problems[:5]),
            )
        os.chmod(partial, 0o755)  # noqa: S103 - root-owned, mounted read-only: traversable
        try:
            partial.rename(target)
        except OSError:
            # Another runner finished the same image first: its copy serves.
            shutil.rmtree(partial, ignore_errors=True)
            if not target.is_dir():
                raise

    def _remove_stale_partials(self) -> None:
        """Half-unpacked images of runners that died while unpacking."""
        for entry in self.directory.glob(f"*{PARTIAL}-*"):
            pid = entry.name.rpartition(PARTIAL + "-")[2].partition("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(entry, ignore_errors=True)

    def check(self, root: Path) -> list[str]:
        """What makes an unpacked root unfit to be shared: a setuid/setgid file, a file
        or directory writable by others than its owner, anything the task user owns."""
        problems = []
        for directory, names, files in os.walk(root):
            for name in (*names, *files):
                path = Path(directory, name)
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    continue
                relative = "/" + str(path.relative_to(root))
                if info.st_uid == self._task_uid or info.st_gid == self._task_uid:
                    problems.append(f"{relative} belongs to the task user")
                if info.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(info.st_mode):
                    problems.append(f"{relative} is setuid or setgid")
                if (
                    info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                    and relative.lstrip("/") not in MOUNT_POINTS
                ):
                    problems.append(f"{relative} is writable by others than its owner")
        return problems

    def prune(self, in_use: set[Path]) -> list[Path]:
        """Remove every unpacked root no container and no runner uses: not in
        ``in_use`` (the roots of every container's bundle, whoever runs it), not
        leased by a live runner (its lease taken exclusively, without waiting, proves
        none holds it; a runner that wants it meanwhile waits, then unpacks it again)."""
        removed: list[Path] = []
        if not self.directory.is_dir():
            return removed
        for entry in sorted(self.directory.iterdir()):
            if not entry.is_dir() or PARTIAL in entry.name or entry in in_use:
                continue
            if entry in self._leases:
                continue
            fd = os.open(_lease_file(entry), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live runner uses it
                shutil.rmtree(entry, ignore_errors=True)
                with contextlib.suppress(OSError):
                    _lease_file(entry).unlink()
                removed.append(entry)
            finally:
                os.close(fd)
        return removed


def _lease_file(root: Path) -> Path:
    return root.with_name(root.name + LEASE)


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, whole or not at all."""
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(json.dumps(value), encoding="utf-8")
    partial.rename(path)
