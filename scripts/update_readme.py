"""Regenerate the configuration table in README.md and docs/settings.md from the settings model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from runner.policy import load_bundle
from runner.settings import PROJECT_ROOT, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
SETTINGS_DOC = README.parent / "docs" / "settings.md"
# Every file with a generated settings table (between the markers below).
TARGETS = (README, SETTINGS_DOC)
BLOCK = re.compile(r"(<!-- settings-table:start[^>]*-->\n).*?(<!-- settings-table:end -->)", re.S)


def policy_defaults() -> dict[str, str]:
    """What the bundle in policies/ gives each policy key: its default and ceiling."""
    config = load_bundle(PROJECT_ROOT / "policies").config
    shown = {
        f"limits.{name}": f"`{_number(bound.default)}` (ceiling `{_number(bound.ceiling)}`)"
        for name, bound in config.limits.bounds().items()
    }
    shown["imports.stdlib_allow"] = f"{len(config.imports.stdlib_allow)} pure-computation modules"
    shown["imports.external_allow"] = ", ".join(config.imports.external_allow) or "none"
    shown["imports.builtins_deny"] = "n8n's list (eval, exec, open, type, getattr, ...)"
    shown["apparmor.profile"] = f"`{config.apparmor.profile}`"
    return shown


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(text: str) -> str:
    if not BLOCK.search(text):
        sys.exit("no settings-table markers in the file")
    table = settings_table(policy_defaults())
    return BLOCK.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


if __name__ == "__main__":
    for target in TARGETS:
        target.write_text(render(target.read_text(encoding="utf-8")), encoding="utf-8")
