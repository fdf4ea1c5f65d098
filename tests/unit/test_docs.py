"""The configuration tables (README.md, docs/settings.md) are generated from the settings model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "update_readme", ROOT / "scripts/update_readme.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_matches_the_model() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _generator().render(text) == text, "README.md is stale: run `make docs`"


def test_docs_settings_table_matches_the_model() -> None:
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert _generator().render(text) == text, "docs/settings.md is stale: run `make docs`"


@pytest.mark.parametrize("name", ["log_format", "policy_dir", "health_check_server_port"])
def test_every_setting_is_in_the_docs_table(name: str) -> None:
    from runner.settings import env_name

    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert f"`{env_name(name)}`" in text
