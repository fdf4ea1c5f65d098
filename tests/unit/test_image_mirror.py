"""A Debian mirror URI with credentials never reaches the task image or the build log.

No network and no Docker: a fake ``debootstrap`` (a shell script doing what the real
one does with its mirror argument: write ``deb <mirror> <suite> main`` into the new
root's sources.list, and print the URI it fetches from) and a fake Docker client that
reads the root filesystem archive it is asked to import.
"""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ImageBuildError
from runner.sandbox import image
from runner.sandbox.image import (
    ImageBuilder,
    ImageRecipe,
    bootstrap_command,
    mirror_access,
    redact,
)

MIRROR = "https://alice:s3cret%2Fpw@mirror.example:8443/debian"
SECRETS = ("s3cret", "alice:", "s3cret%2Fpw")

# What debootstrap does with its mirror argument (the last one), plus a
# wget that prints its settings (the WGETRC file), as a verbose tool might.
FAKE_DEBOOTSTRAP = """#!/bin/sh
set -eu
suite="$3"; root="$4"; mirror="$5"
mkdir -p "$root/etc/apt" "$root/var/lib/apt/lists" "$root/var/log"
echo "W: Retrying failed download of $mirror/dists/$suite/InRelease"
echo "deb $mirror $suite main" > "$root/etc/apt/sources.list"
echo "bootstrap of $suite from $mirror" > "$root/var/log/bootstrap.log"
if [ -n "${WGETRC:-}" ]; then echo "wget settings: $(tr '\\n' ' ' < "$WGETRC")"; fi
if [ -n "${LEAK:-}" ]; then echo "$LEAK" > "$root/etc/leaked.conf"; fi
echo "I: Base system installed successfully."
"""


class FakeImages:
    def __init__(self) -> None:
        self.imported: dict[str, bytes] = {}

    def get(self, tag: str) -> Any:
        if tag not in self.imported:
            import docker.errors

            raise docker.errors.ImageNotFound(tag)
        return type("Image", (), {"id": f"sha256:{tag}"})()


class FakeApi:
    def __init__(self, images: FakeImages) -> None:
        self.images = images

    def import_image_from_file(self, path: str, repository: str, tag: str, **_: Any) -> None:
        with tarfile.open(path) as archive:
            member = archive.extractfile("./etc/apt/sources.list")
            assert member is not None
            self.images.imported[f"{repository}:{tag}"] = member.read()


class FakeDocker:
    def __init__(self) -> None:
        self.images = FakeImages()
        self.api = FakeApi(self.images)


@pytest.fixture
def fake_debootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "debootstrap"
    script.write_text(FAKE_DEBOOTSTRAP)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(image.shutil, "which", lambda name: str(script))
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    return script


def bootstrap(mirror: str) -> tuple[bytes, list[str]]:
    """Bootstrap the base with ``mirror``: the image's sources.list and the build log."""
    lines: list[str] = []
    client = FakeDocker()
    recipe = ImageRecipe(
        image_dir=Path("sandbox_image"),
        base_image=None,
        debian_suite="bookworm",
        debian_mirror=mirror,
    )
    builder = ImageBuilder(client, recipe, lines.append)  # type: ignore[arg-type]
    builder.ensure_base()
    (sources,) = client.images.imported.values()
    return sources, lines


def test_the_mirror_is_split_into_a_bare_uri_and_credentials() -> None:
    access = mirror_access(MIRROR)
    assert access.uri == "https://mirror.example:8443/debian"
    assert (access.username, access.password) == ("alice", "s3cret/pw")
    assert access.wgetrc() == "user = alice\npassword = s3cret/pw\n"
    command = bootstrap_command("/usr/sbin/debootstrap", "bookworm", Path("/r"), access)
    assert command[-1] == "https://mirror.example:8443/debian"
    assert not any(secret in " ".join(command) for secret in SECRETS)
    assert redact(f"E: cannot fetch {MIRROR}/dists", access.secrets) == (
        "E: cannot fetch https://***@mirror.example:8443/debian/dists"
    )
    # A token as the user name, no password: the token is the secret.
    token = mirror_access("https://tok3n-abcdef@mirror.example/debian")
    assert token.uri == "https://mirror.example/debian"
    assert token.wgetrc() == "user = tok3n-abcdef\n"
    assert token.secrets == ("tok3n-abcdef",)
    # Without credentials nothing changes.
    plain = mirror_access("http://deb.debian.org/debian")
    assert plain.uri == "http://deb.debian.org/debian"
    assert plain.wgetrc() is None
    assert plain.secrets == ()


def test_a_line_break_in_the_credentials_is_refused() -> None:
    with pytest.raises(ImageBuildError, match="line break"):
        mirror_access("http://alice:pw%0Aexecute%3Don@mirror.example/debian")


@pytest.mark.usefixtures("fake_debootstrap")
def test_credentials_reach_neither_sources_list_nor_the_build_log() -> None:
    sources, lines = bootstrap(MIRROR)
    assert sources == b"deb https://mirror.example:8443/debian bookworm main\n"
    log = "\n".join(lines)
    assert "failed download of https://mirror.example:8443/debian/dists/bookworm" in log
    # wget had them (a user name alone is no secret), and its output is redacted
    assert "wget settings: user = alice password = ***" in log
    assert not any(secret in log for secret in SECRETS), log


@pytest.mark.usefixtures("fake_debootstrap")
def test_a_root_filesystem_that_still_holds_them_is_never_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEAK", "deb https://alice:s3cret%2Fpw@mirror.example:8443/debian")
    with pytest.raises(ImageBuildError, match="holds the Debian mirror's credentials") as caught:
        bootstrap(MIRROR)
    assert "etc/leaked.conf" in str(caught.value.hint)
    assert "s3cret" not in str(caught.value) + str(caught.value.hint)


@pytest.mark.usefixtures("fake_debootstrap")
def test_a_mirror_without_credentials_is_used_as_is() -> None:
    sources, _ = bootstrap("http://deb.debian.org/debian")
    assert sources == b"deb http://deb.debian.org/debian bookworm main\n"
