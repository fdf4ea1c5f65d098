"""The runner image: the service itself (``sandbox-runner serve``, ``up``, ``broker``).

Built from the top-level ``Dockerfile`` on the **same base** as the task image (the
Debian root filesystem bootstrapped from the host's apt mirror, or
``SANDBOX_BASE_IMAGE``), so no registry is needed. Python packages never come from
inside the build: the wheels of the project and of its dependencies are built on the
host (``pip wheel``, with the host's own package index configuration) and installed
offline in the image (``--no-index``). The host's Python must have the same minor
version as the base's (both are Debian bookworm's 3.11 here), since the wheels are
built for the host's interpreter.

Debian packages the base lacks (:data:`DEBIAN_PACKAGES`: ``runc``, the OCI backend's
runtime) are downloaded the same way, on the host with its own apt configuration
(``apt-get download``: its mirror and any credentials stay the host's), and installed
in the image with ``dpkg -i``, so the build of the bootstrapped base needs no network.
A host without apt, or whose apt cannot fetch them, leaves them to the build, which
then installs them with the base's apt over the network (as it does for a registry
base).

The image's tag is a hash of its inputs (Dockerfile, pyproject.toml, the ``runner``
package, ``policies/``, ``sandbox_image/``, the base image's id), like the task
image's, so it is rebuilt only when one of them changes. The README is not an
input: editing prose does not rebuild an image.

Needs a source checkout (the Dockerfile lives there), not an installed wheel.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from runner.errors import ImageBuildError
from runner.sandbox.bundle import hash_files
from runner.sandbox.docker_errors import DOCKER_FAULTS, docker_errors
from runner.sandbox.image import BASE_REPOSITORY, ImageBuilder, Progress, docker_build

RUNNER_REPOSITORY = "sandbox-runner"
# Also tagged so (moving): what compose files and `docker run` examples name.
LATEST = "latest"
RUNNER_UID = 10002
# What decides the image, relative to the checkout. Bytecode caches are never inputs.
INPUT_ROOTS = ("runner", "policies", "sandbox_image")
INPUT_FILES = ("Dockerfile", "pyproject.toml")
# Copied into the build context next to the wheels (the runner reads them at run time).
CONTEXT_ROOTS = ("policies", "sandbox_image")
# Debian packages the runner image adds to the base: the OCI backend's runtime. Present
# in every runner image (the default engine stays Docker: SANDBOX_BACKEND=docker in the
# Dockerfile), so that opting in is a matter of `docker run` flags, not another image.
DEBIAN_PACKAGES = ("runc",)


def _files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield path


@dataclass(frozen=True, slots=True)
class RunnerImageRecipe:
    project_dir: Path
    repository: str = RUNNER_REPOSITORY
    uid: int = RUNNER_UID

    def inputs(self) -> dict[str, Path]:
        """Relative path -> file, for every file that decides the image."""
        missing = [name for name in INPUT_FILES if not (self.project_dir / name).is_file()]
        if missing:
            raise ImageBuildError(
                f"{self.project_dir} is not a sandbox-runner source checkout",
                hint=f"missing {', '.join(missing)}; the runner image is built from the "
                "repository (`make image`)",
            )
        files = {name: self.project_dir / name for name in INPUT_FILES}
        for root in INPUT_ROOTS:
            for path in _files_under(self.project_dir / root):
                files[str(path.relative_to(self.project_dir))] = path
        return files

    def tag(self, base_id: str) -> str:
        digest = hashlib.sha256(f"base={base_id};uid={self.uid}\n".encode())
        return f"{self.repository}:{hash_files(self.inputs(), digest)[:16]}"


class RunnerImageBuilder:
    """Builds (only when its inputs changed) and names the runner image."""

    def __init__(
        self,
        client: docker.DockerClient,
        recipe: RunnerImageRecipe,
        base: ImageBuilder,
        progress: Progress,
        *,
        python: str = sys.executable,
    ) -> None:
        self._client = client
        self._recipe = recipe
        self._base = base
        self._progress = progress
        self._python = python

    def ensure(self) -> str:
        """The runner image's tag; builds the base and the image when missing."""
        base_id = self._base.ensure_base()
        tag = self._recipe.tag(base_id)
        if self._base.image_id(tag) is None:
            base_tag = self._base.base_tag
            self._check_python(base_tag)
            with tempfile.TemporaryDirectory(prefix="sandbox-runner-wheels-") as tmp:
                wheels = Path(tmp) / "wheels"
                debs = Path(tmp) / "debs"
                wheels.mkdir()
                debs.mkdir()
                self._build_wheels(wheels)
                self._download_debs(debs)
                self._build(tag, base_tag, wheels, debs)
        self._tag_latest(tag)
        return tag

    def _tag_latest(self, tag: str) -> None:
        with docker_errors(f"Cannot tag {tag} as {LATEST}", into=ImageBuildError):
            self._client.api.tag(tag, self._recipe.repository, LATEST)

    def _check_python(self, base_tag: str) -> None:
        """The host builds the wheels, so its Python must match the base's (minor)."""
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        try:
            output = self._client.containers.run(
                base_tag,
                ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                network_mode="none",
                remove=True,
            )
        except DOCKER_FAULTS as exc:
            raise ImageBuildError(
                f"Cannot run python3 in the base image {base_tag}", hint=str(exc)
            ) from exc
        base = output.decode().strip() if isinstance(output, bytes) else str(output).strip()
        if base != host:
            raise ImageBuildError(
                f"The base image has Python {base}, the host {host}",
                hint="the wheels are built on the host; build with a Python of the base's "
                "version, or set SANDBOX_BASE_IMAGE to a base with the host's version",
            )

    def _build_wheels(self, dest: Path) -> None:
        self._progress("building wheels of the runner and its dependencies on the host")
        command = [
            self._python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(dest),
            str(self._recipe.project_dir),
            "pip",  # installs the others inside the image, run from its wheel
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = [line for line in result.stderr.splitlines() if line.strip()][-5:]
            raise ImageBuildError(
                f"pip wheel failed with exit code {result.returncode}", hint=" | ".join(tail)
            )
        count = len(list(dest.glob("*.whl")))
        self._progress(f"{count} wheels ready")

    def _download_debs(self, dest: Path) -> None:
        """:data:`DEBIAN_PACKAGES` as ``.deb`` files in ``dest``, by the host's apt.

        Not fatal: without them (no apt here, a package the host's sources lack) the
        build installs them with the base's apt instead, over the network.
        """
        apt_get = shutil.which("apt-get")
        if apt_get is None:
            self._progress("no apt-get on this host: the build installs runc itself")
            return
        command = [apt_get, "download", "--quiet", *DEBIAN_PACKAGES]
        try:
            result = subprocess.run(
                command, cwd=dest, capture_output=True, text=True, check=False, timeout=300
            )
            problem = [line for line in result.stderr.splitlines() if line.startswith("E:")]
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = [str(exc)]
        got = sorted(deb.name for deb in dest.glob("*.deb"))
        if problem or len(got) != len(DEBIAN_PACKAGES):
            for deb in dest.glob("*.deb"):
                deb.unlink()
            self._progress(
                f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed "
                f"({' | '.join(problem[-2:]) or 'no package'}): the build installs them itself"
            )
            return
        self._progress(f"downloaded {', '.join(got)} on the host")

    def _context(self, wheels: Path, debs: Path) -> io.BytesIO:
        context = io.BytesIO()
        project = self._recipe.project_dir
        with tarfile.open(fileobj=context, mode="w") as tar:
            tar.add(project / "Dockerfile", arcname="Dockerfile")
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=f"wheels/{wheel.name}")
            # The directory itself too: COPY debs/ needs it, even empty.
            tar.add(debs, arcname="debs", recursive=False)
            for deb in sorted(debs.glob("*.deb")):
                tar.add(deb, arcname=f"debs/{deb.name}")
            for root in CONTEXT_ROOTS:
                for path in _files_under(project / root):
                    tar.add(path, arcname=str(path.relative_to(project)))
        context.seek(0)
        return context

    def _build(self, tag: str, base_tag: str, wheels: Path, debs: Path) -> None:
        self._progress(f"building runner image {tag} on {base_tag}")
        bootstrapped = base_tag.startswith(f"{BASE_REPOSITORY}:")
        has_debs = any(debs.glob("*.deb"))
        docker_build(
            self._client,
            self._context(wheels, debs),
            tag,
            what="the runner image",
            # Nothing in the build needs a network when the host downloaded the
            # packages and the base is ours (it has tini); with none, a host without a
            # working default bridge builds too. Otherwise apt runs in the build.
            network=not (bootstrapped and has_debs),
            buildargs={"BASE_IMAGE": base_tag, "RUNNER_UID": str(self._recipe.uid)},
            progress=self._progress,
        )


__all__ = ["RUNNER_REPOSITORY", "RunnerImageBuilder", "RunnerImageRecipe"]
