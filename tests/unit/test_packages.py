"""Third-party packages of the task image, without Docker and without a network.

The lock file (its format, what it is checked against), the wheel cache (hashes
checked on every use, nothing downloaded when everything is there), the tag (the
lock's hash in it), the policy's ``[image] python_packages`` (no pip option or URL
gets through), the bundle's hash (the lock in it), ``image lock --check``. The image
built from a lock, and tasks importing numpy and pandas in it, are
``tests/integration/test_packages.py``.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import TEST_PACKAGES, TEST_PACKAGES_LOCK, packages_bundle
from pydantic import ValidationError

from runner.cli import main
from runner.cli.wiring import image_recipe
from runner.errors import ConfigurationError, ImageBuildError
from runner.policy import load_bundle
from runner.policy.model import PACKAGE_LOCK_FILE, ImageSection
from runner.sandbox.image import ImageRecipe
from runner.sandbox.packages import (
    LOCK_FILE,
    TARGET,
    LockedWheel,
    Target,
    WheelCache,
    load_lock,
    locked_wheel,
    parse_lock,
    render_lock,
    request_sha256,
)
from runner.settings import PROJECT_ROOT, Settings

X86 = Target(python_version="3.11", glibc=(2, 36), arch="x86_64")


def wheel(name: str = "numpy", version: str = "2.4.6", sha: str = "a" * 64) -> LockedWheel:
    return LockedWheel(name, version, sha, f"{name}-{version}-py3-none-any.whl", (name,))


def make_wheel(directory: Path, filename: str, members: dict[str, str]) -> Path:
    path = directory / filename
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


# -- the lock file ----------------------------------------------------------------------


def test_a_rendered_lock_parses_back_to_the_same_pins() -> None:
    wheels = [wheel("pandas", "3.1.1", "b" * 64), wheel("numpy", "2.4.6", "a" * 64)]
    text = render_lock(["numpy==2.*", "pandas"], wheels, X86)
    lock = parse_lock(text)
    assert lock.requested == ("numpy==2.*", "pandas")
    assert lock.target == "cp311-cp311-manylinux_2_36_x86_64"
    assert lock.request_sha256 == request_sha256(["pandas", "numpy==2.*"], X86)  # order-free
    assert [(w.name, w.version, w.sha256) for w in lock.wheels] == [
        ("numpy", "2.4.6", "a" * 64),
        ("pandas", "3.1.1", "b" * 64),
    ]
    assert lock.provides == ("numpy", "pandas")
    assert lock.sha256 == hashlib.sha256(text.encode()).hexdigest()
    # pip reads the same file: one pinned requirement with its hash per package.
    assert "numpy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("numpy==2.4.6\n", "line 1 is not part of a locked package", id="no-hash"),
        pytest.param(
            "numpy==2.4.6 \\\n    --hash=sha256:abc\n    # wheel: n.whl\n    # provides: n\n",
            "line 1 is not part of a locked package",
            id="short-hash",
        ),
        pytest.param("# request: numpy\n", "the header lacks target, request-sha256", id="header"),
    ],
)
def test_a_lock_that_is_not_ours_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_lock(text, "x.lock")


def test_load_lock_checks_the_lock_against_the_bundles_request(tmp_path: Path) -> None:
    assert load_lock(tmp_path, ()) is None  # nothing asked for, nothing to read
    with pytest.raises(ConfigurationError, match="cannot read the lock") as missing:
        load_lock(tmp_path, ("pandas",), X86)
    assert "sandbox-runner image lock" in str(missing.value)

    (tmp_path / LOCK_FILE).write_text(render_lock(["pandas"], [wheel("pandas")], X86))
    lock = load_lock(tmp_path, ["pandas"], X86)
    assert lock is not None
    assert [w.name for w in lock.wheels] == ["pandas"]
    with pytest.raises(ConfigurationError, match="made for another request or target"):
        load_lock(tmp_path, ["pandas", "numpy"], X86)  # the request changed: re-lock
    other_arch = Target(python_version="3.11", glibc=(2, 36), arch="aarch64")
    with pytest.raises(ConfigurationError, match="made for another request or target"):
        load_lock(tmp_path, ["pandas"], other_arch)
    with pytest.raises(ConfigurationError, match="asks for no package"):
        load_lock(tmp_path, (), X86)  # a lock left behind is not ignored


def test_the_target_names_every_manylinux_tag_the_image_can_load() -> None:
    assert X86.platforms[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(
        X86.platforms
    )
    options = X86.pip_options()
    assert "--only-binary=:all:" in options  # no source distribution is ever built
    assert options[options.index("--python-version") + 1] == "3.11"
    assert options[options.index("--abi") + 1] == "cp311"


def test_the_tests_lock_matches_their_request() -> None:
    if TARGET.arch != "x86_64":
        pytest.skip(f"the committed test lock is for x86_64, this host is {TARGET.arch}")
    lock = parse_lock(TEST_PACKAGES_LOCK.read_text(encoding="utf-8"))
    assert lock.request_sha256 == request_sha256(TEST_PACKAGES)
    assert {"numpy", "pandas"} <= {w.name for w in lock.wheels}
    assert {"numpy", "pandas", "dateutil"} <= set(lock.provides)


# -- wheels -----------------------------------------------------------------------------


def test_a_wheel_is_locked_by_its_file_and_provides_what_it_installs(tmp_path: Path) -> None:
    path = make_wheel(
        tmp_path,
        "Python_Dateutil-4.0.0-py3-none-any.whl",
        {
            "dateutil/__init__.py": "",
            "dateutil/tz/tz.py": "",
            "six.py": "",
            "_speedups.cpython-311-x86_64-linux-gnu.so": "",
            "numpy.libs/libopenblas.so": "",
            "python_dateutil-4.0.0.dist-info/METADATA": "",
            "python_dateutil-4.0.0.data/scripts/tool": "",
        },
    )
    locked = locked_wheel(path)
    assert locked.name == "python-dateutil"
    assert locked.version == "4.0.0"
    assert locked.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert locked.provides == ("_speedups", "dateutil", "six")
    with pytest.raises(ImageBuildError, match="not a wheel file name"):
        locked_wheel(tmp_path / "pandas.tar.gz")


def test_the_cache_checks_hashes_and_downloads_nothing_when_complete(tmp_path: Path) -> None:
    source = make_wheel(tmp_path, "demo-1.0-py3-none-any.whl", {"demo/__init__.py": ""})
    locked = locked_wheel(source)
    lock = parse_lock(render_lock(["demo"], [locked], X86))
    cache = WheelCache(tmp_path / "cache")
    assert cache.missing(lock) == [locked]
    cache.put(source)
    assert cache.missing(lock) == []
    lines: list[str] = []
    # A pip that cannot run: everything is here, so it is never asked.
    cache.ensure(lock, lines.append, target=X86, python="/nonexistent/python")
    assert lines == [f"1 locked wheels in the cache ({cache.directory})"]

    # A wheel whose content changed in the cache is not used: it is removed and fetched
    # again (here the fetch fails: no pip), never installed.
    (cache.directory / locked.filename).write_bytes(b"tampered")
    with pytest.raises(ImageBuildError, match="pip download failed"):
        cache.ensure(lock, lines.append, target=X86, python="/nonexistent/python")
    assert not (cache.directory / locked.filename).exists()


# -- the image, the policy, the bundle ------------------------------------------------


def test_the_tag_holds_the_locks_hash() -> None:
    lock = parse_lock(TEST_PACKAGES_LOCK.read_text(encoding="utf-8"))
    plain = ImageRecipe(PROJECT_ROOT / "sandbox_image", None, "bookworm", None)
    with_packages = ImageRecipe(
        PROJECT_ROOT / "sandbox_image", None, "bookworm", None, packages=lock
    )
    same_lock = ImageRecipe(
        PROJECT_ROOT / "sandbox_image", None, "bookworm", None, packages=parse_lock(lock.text)
    )
    relocked = ImageRecipe(
        PROJECT_ROOT / "sandbox_image",
        None,
        "bookworm",
        None,
        packages=parse_lock(lock.text.replace("# request:", "# (re-locked)\n# request:")),
    )
    tags = {r.task_tag("sha256:base") for r in (plain, with_packages, relocked)}
    assert len(tags) == 3
    assert same_lock.task_tag("sha256:base") == with_packages.task_tag("sha256:base")


def test_the_default_bundle_asks_for_no_package(clean_env: None) -> None:
    assert load_bundle(PROJECT_ROOT / "policies").config.image.python_packages == ()
    assert not (PROJECT_ROOT / "policies" / LOCK_FILE).exists()
    assert image_recipe(Settings()).packages is None
    assert PACKAGE_LOCK_FILE == LOCK_FILE  # the policy's name for it and the image's


def test_a_bundle_with_packages_builds_from_its_lock(tmp_path: Path, clean_env: None) -> None:
    bundle_dir = packages_bundle(tmp_path / "policies")
    recipe = image_recipe(Settings(policy_dir=bundle_dir))
    assert recipe.packages is not None
    assert recipe.packages.text == TEST_PACKAGES_LOCK.read_text(encoding="utf-8")
    bundle = load_bundle(bundle_dir)
    assert bundle.config.image.python_packages == TEST_PACKAGES
    # The lock is part of what tasks run under: in the bundle's files and its hash.
    assert PACKAGE_LOCK_FILE in bundle.files
    before = bundle.sha256
    lock = bundle_dir / PACKAGE_LOCK_FILE
    lock.write_text(lock.read_text() + "\n")
    assert load_bundle(bundle_dir).sha256 != before


@pytest.mark.parametrize(
    "entry",
    [
        "--index-url=https://evil.example/simple",
        "-e .",
        "pandas @ https://evil.example/pandas.whl",
        "pandas; python_version > '3'",
        "./local/path",
        "pandas==2.*  --hash=sha256:00",
        "",
    ],
)
def test_python_packages_takes_requirements_never_options_or_urls(entry: str) -> None:
    with pytest.raises(ValidationError):
        ImageSection(repository="sandbox-runner-task", uid=10001, python_packages=(entry,))


@pytest.mark.parametrize(
    "entry", ["pandas", "numpy==2.*", "pandas[excel]>=2, <4", "python-dateutil~=2.9", "a.b_c"]
)
def test_python_packages_takes_names_extras_and_versions(entry: str) -> None:
    section = ImageSection(repository="sandbox-runner-task", uid=10001, python_packages=(entry,))
    assert section.python_packages == (entry,)


def test_image_lock_check_says_whether_the_lock_is_current(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_POLICY_DIR", str(PROJECT_ROOT / "policies"))
    result = CliRunner().invoke(main, ["image", "lock", "--check"])
    assert result.exit_code == 0, result.output
    assert "no package asked for" in result.output

    bundle_dir = packages_bundle(tmp_path / "policies")
    monkeypatch.setenv("SANDBOX_POLICY_DIR", str(bundle_dir))
    result = CliRunner().invoke(main, ["image", "lock", "--check"])
    if TARGET.arch == "x86_64":  # the committed test lock's target
        assert result.exit_code == 0, result.output
        assert "up to date" in result.output
    else:
        assert result.exit_code == 1, result.output
        assert "made for another request or target" in result.output
    toml = bundle_dir / "sandbox.toml"
    toml.write_text(toml.read_text().replace('"pandas"]', '"pandas", "pytz"]'))
    result = CliRunner().invoke(main, ["image", "lock", "--check"])
    assert result.exit_code == 1
    assert "made for another request or target" in result.output
