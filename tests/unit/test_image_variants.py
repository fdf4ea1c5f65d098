"""Image variants: another task image for the tenants that name it (issue 14).

A bundle declares ``[image.variants.<name>] python_packages`` with its own lock
(``python-packages.<name>.lock``); a tenant profile's ``image_variant`` names one. What
is checked here without Docker: the schema, the lock (in the bundle's files and hash,
checked against the request, `image lock --check`), the lint rule for an unknown
variant, what `policy explain` and `policy diff` show, the recipe (its own tag), and
the pipeline: a tenant's task runs on its variant's sandbox and the record names the
variant's image; a runner without the variant refuses the task (never runs it on the
default image). tests/integration/test_tenants.py runs it with real containers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import TEST_PACKAGES, TEST_PACKAGES_LOCK, preload_bundle, variant_bundle
from pydantic import ValidationError

from runner.cli import main
from runner.cli.wiring import image_recipe, image_variants, make_pipeline
from runner.errors import ConfigurationError
from runner.pipeline import ImageVariantSandbox, TaskRequest
from runner.policy import diff_policies, explain_bundle, lint_bundle, load_bundle, load_policy
from runner.policy.model import ImageSection, variant_lock_file
from runner.sandbox.base import ExecutionResult, Limits, Outcome, TaskSpec
from runner.sandbox.packages import TARGET, lock_file
from runner.settings import PROJECT_ROOT, Settings

SCIENCE = (
    'version = 1\nimage_variant = "science"\n'
    '[imports]\nexternal_allow = ["numpy", "pandas", "dateutil"]\n'
)
BASIC = 'version = 1\n[imports]\nstdlib_allow = ["json"]\n'
PANDAS = "import pandas\nreturn [{'json': {'v': pandas.__version__}}]"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return variant_bundle(
        tmp_path / "policies",
        PROJECT_ROOT / "policies",
        "science",
        {"data": SCIENCE, "basic": BASIC},
    )


class RecordingSandbox:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.cancelled: list[str] = []

    async def run(self, spec: TaskSpec, limits: Limits) -> ExecutionResult:
        self.ran.append(spec.task_id)
        return ExecutionResult(Outcome.SUCCESS, result=[{"json": {}}], container_id="c1")

    async def cancel(self, task_id: str) -> bool:
        self.cancelled.append(task_id)
        return False

    async def aclose(self) -> None:
        return None


def test_a_variant_is_a_name_and_at_least_one_package() -> None:
    section = ImageSection.model_validate(
        {
            "repository": "sandbox-runner-task",
            "uid": 10001,
            "variants": {"science": {"python_packages": ["pandas"]}},
        }
    )
    assert section.variants["science"].python_packages == ("pandas",)
    for bad in (
        {"Science": {"python_packages": ["pandas"]}},  # names are lower case
        {"a.b": {"python_packages": ["pandas"]}},  # no dot: it is part of the lock's name
        {"science": {"python_packages": []}},  # a variant of nothing is the default image
        {"science": {"python_packages": ["--index-url=https://evil.example/simple"]}},
        {"science": {"python_packages": ["pandas"], "preload": ["pandas"]}},  # unknown key
    ):
        with pytest.raises(ValidationError):
            ImageSection.model_validate(
                {"repository": "sandbox-runner-task", "uid": 10001, "variants": bad}
            )


def test_the_policy_and_the_image_build_name_the_same_lock_file() -> None:
    for variant in (None, "science", "gpu-2"):
        assert variant_lock_file(variant) == lock_file(variant)
    assert lock_file("science") == "python-packages.science.lock"


def test_a_variants_lock_is_in_the_bundle_and_its_hash(bundle_dir: Path, clean_env: None) -> None:
    bundle = load_bundle(bundle_dir)
    assert "python-packages.science.lock" in bundle.files
    assert "pandas" in bundle.variant_provides["science"]
    assert bundle.lock_provides == frozenset()  # the default image: the standard library
    assert "pandas==3.1.1" in bundle.lock_pins["science"]
    before = bundle.sha256
    lock = bundle_dir / "python-packages.science.lock"
    lock.write_text(lock.read_text() + "\n")
    assert load_bundle(bundle_dir).sha256 != before


def test_each_variant_builds_from_its_own_lock_under_its_own_tag(
    bundle_dir: Path, clean_env: None
) -> None:
    settings = Settings(policy_dir=bundle_dir)
    default, science = image_recipe(settings), image_recipe(settings, variant="science")
    assert default.packages is None
    assert science.packages is not None
    assert science.packages.text == TEST_PACKAGES_LOCK.read_text(encoding="utf-8")
    assert default.task_tag("sha256:base") != science.task_tag("sha256:base")
    with pytest.raises(ConfigurationError, match="no image variant 'gpu'"):
        image_recipe(settings, variant="gpu")
    # Only the variants some tenant names are made ready by a runner.
    assert image_variants(load_policy(settings)) == ("science",)


def test_a_variant_with_a_stale_or_missing_lock_stops_the_build(
    bundle_dir: Path, clean_env: None
) -> None:
    settings = Settings(policy_dir=bundle_dir)
    toml = bundle_dir / "sandbox.toml"
    toml.write_text(toml.read_text().replace('"pandas"]\n', '"pandas", "pytz"]\n'))
    with pytest.raises(ConfigurationError) as stale:
        image_recipe(settings, variant="science")
    assert "python-packages.science.lock was made for another request" in str(stale.value)
    assert "[image.variants.science] python_packages" in str(stale.value)
    (bundle_dir / "python-packages.science.lock").unlink()
    with pytest.raises(ConfigurationError, match="cannot read the lock of"):
        image_recipe(settings, variant="science")


def test_image_lock_check_covers_every_variant(
    bundle_dir: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_POLICY_DIR", str(bundle_dir))
    result = CliRunner().invoke(main, ["image", "lock", "--check"])
    if TARGET.arch == "x86_64":  # the committed test lock's target
        assert result.exit_code == 0, result.output
        assert "python-packages.science.lock: up to date" in result.output
        assert "[image]: no package asked for" in result.output
    (bundle_dir / "python-packages.science.lock").unlink()
    result = CliRunner().invoke(main, ["image", "lock", "--check"])
    assert result.exit_code == 1
    assert "python-packages.science.lock: cannot read the lock" in result.output


def test_lint_refuses_a_tenant_naming_a_variant_the_bundle_lacks(
    bundle_dir: Path, clean_env: None
) -> None:
    assert not [f for f in lint_bundle(bundle_dir).findings if f.rule.startswith("tenant.")]
    (bundle_dir / "tenants" / "gpu.toml").write_text('version = 1\nimage_variant = "gpu"\n')
    [finding] = [
        f for f in lint_bundle(bundle_dir).findings if f.rule == "tenant.image-variant-unknown"
    ]
    assert finding.file == "tenants/gpu.toml"
    assert "'gpu' is not one of the bundle's [image.variants] (declared: science)" in (
        finding.message
    )
    with pytest.raises(ConfigurationError, match=r"tenant\.image-variant-unknown"):
        load_policy(Settings(policy_dir=bundle_dir))


def test_explain_shows_each_variant_and_what_its_lock_pins(
    bundle_dir: Path, clean_env: None
) -> None:
    document = explain_bundle(load_bundle(bundle_dir), tenant="data")
    variant = document["image"]["variants"]["science"]
    assert variant["pythonPackages"] == list(TEST_PACKAGES)
    assert "numpy==2.4.6" in variant["locked"]
    assert document["tenant"]["imageVariant"] == "science"
    # A bundle without variants explains as before: no key.
    assert "variants" not in explain_bundle(load_bundle(PROJECT_ROOT / "policies"))["image"]
    result = CliRunner().invoke(
        main, ["policy", "explain", "--tenant", "data"], env={"SANDBOX_POLICY_DIR": str(bundle_dir)}
    )
    assert result.exit_code == 0, result.output
    assert "variant      science: numpy==2.4.6, pandas==3.1.1" in result.output


def test_diff_lists_the_packages_a_tenant_gains_with_a_variant(
    bundle_dir: Path, tmp_path: Path, clean_env: None
) -> None:
    bundle = load_bundle(bundle_dir)
    between = diff_policies(bundle, bundle, tenant_a="basic", tenant_b="data")
    by_key = {d.key: d for d in between.differences}
    assert (by_key["image_variant"].a, by_key["image_variant"].b) == (None, "science")
    packages = by_key["image.packages"]
    assert packages.effect.value == "wider"
    assert "pandas==3.1.1" in packages.added
    # A re-lock that changes a version is a difference of the bundles, per tenant.
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    lock = other / "python-packages.science.lock"
    lock.write_text(lock.read_text().replace("pandas==3.1.1", "pandas==3.1.2"))
    changed = diff_policies(bundle, load_bundle(other))
    [difference] = [d for d in changed.differences if d.key == "image.packages"]
    assert difference.scope == "tenant data"
    assert difference.added == ("pandas==3.1.2",)
    assert difference.removed == ("pandas==3.1.1",)


def pipeline_with(bundle_dir: Path, variants: list[ImageVariantSandbox]) -> Any:
    default = RecordingSandbox()
    pipeline = make_pipeline(
        Settings(policy_dir=bundle_dir),
        default,
        image="task:default",
        image_id="sha256:default",
        isolation={},
        variants=variants,
    )
    return pipeline, default


async def test_a_tenants_task_runs_on_its_variant_and_the_record_names_it(
    bundle_dir: Path, clean_env: None
) -> None:
    science = RecordingSandbox()
    variant = ImageVariantSandbox(
        "science", science, "task:science", "sha256:science", isolation={"proof": "science"}
    )
    pipeline, default = pipeline_with(bundle_dir, [variant])
    try:
        data = await pipeline.run(TaskRequest(code=PANDAS, profile=pipeline.profile_for("data")))
        basic = await pipeline.run(
            TaskRequest(code="return []", profile=pipeline.profile_for("basic"))
        )
        await pipeline.cancel("some-task")
    finally:
        await pipeline.aclose()
    assert data.outcome is Outcome.SUCCESS, data.document()
    assert science.ran == [data.task_id]
    assert default.ran == [basic.task_id]
    record = data.record.as_json()
    assert (record["image"], record["imageId"], record["imageVariant"]) == (
        "task:science",
        "sha256:science",
        "science",
    )
    assert record["isolation"] == {"proof": "science"}  # the variant's own self-check
    basic_record = basic.record.as_json()
    assert basic_record["isolation"] == {}  # the pipeline's (none, here)
    assert (basic_record["image"], basic_record["imageId"]) == ("task:default", "sha256:default")
    assert "imageVariant" not in basic_record
    # A cancel reaches whichever sandbox runs the task.
    assert science.cancelled == default.cancelled == ["some-task"]


async def test_a_runner_without_the_variant_refuses_the_tenant_never_the_default_image(
    bundle_dir: Path, clean_env: None
) -> None:
    pipeline, _ = pipeline_with(bundle_dir, [])
    try:
        profile = pipeline.profile_for("data")
    finally:
        await pipeline.aclose()
    assert profile.variant is None
    assert profile.refusal == (
        "Tenant data's profile (tenants/data.toml) asks for the image variant 'science'; "
        "this runner has the task image only"
    )
    assert pipeline.profile_for("basic").refusal is None


def test_lint_warns_of_an_allowlisted_module_the_tenants_image_lacks(
    bundle_dir: Path, clean_env: None
) -> None:
    def not_installed() -> dict[str, str]:
        return {
            f.file: f.message
            for f in lint_bundle(bundle_dir).findings
            if f.rule == "imports.external-not-installed"
        }

    assert not_installed() == {}  # data's variant provides numpy, pandas and dateutil
    tenants = bundle_dir / "tenants"
    (tenants / "typo.toml").write_text('version = 1\n[imports]\nexternal_allow = ["pandsa"]\n')
    (tenants / "sci.toml").write_text(
        'version = 1\nimage_variant = "science"\n[imports]\nexternal_allow = ["pandas", "scipy"]\n'
    )
    (tenants / "any.toml").write_text('version = 1\n[imports]\nexternal_allow = ["*"]\n')
    found = not_installed()
    assert found == {
        "tenants/typo.toml": "[imports] external_allow names pandsa, which no package of "
        "the task image provides: its import fails",
        "tenants/sci.toml": "[imports] external_allow names scipy, which no package of "
        "its image variant science provides: its import fails",
    }
    # Warnings: the bundle still loads.
    assert load_policy(Settings(policy_dir=bundle_dir)).tenants["typo"].profile is not None


def test_explain_and_diff_show_what_warm_slots_preload(tmp_path: Path, clean_env: None) -> None:
    before = load_bundle(PROJECT_ROOT / "policies")
    assert explain_bundle(before)["image"]["preload"] == []
    after_dir = preload_bundle(tmp_path / "policies")
    after = load_bundle(after_dir)
    assert explain_bundle(after)["image"]["preload"] == ["pandas"]
    [difference] = [d for d in diff_policies(before, after).differences if d.key == "image.preload"]
    assert (difference.scope, difference.effect.value, difference.added) == (
        "bundle",
        "wider",
        ("pandas",),
    )
