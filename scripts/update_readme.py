"""Regenerate the configuration table in README.md from the settings model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from runner.settings import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- settings-table:start[^>]*-->\n).*?(<!-- settings-table:end -->)", re.S)


def render(text: str) -> str:
    if not BLOCK.search(text):
        sys.exit("README.md has no settings-table markers")
    return BLOCK.sub(lambda m: m.group(1) + settings_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
