"""Write the red-team tables of docs/security.md from the last recorded run.

``.venv/bin/pytest tests/redteam`` records every probe's outcome per mode in
``tests/redteam/last_run.json``; this script renders that record (and the probe
catalog's layer analysis) into the generated blocks of ``docs/security.md``.

    .venv/bin/python scripts/redteam_report.py           # rewrite the blocks
    .venv/bin/python scripts/redteam_report.py --check   # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The catalog lives with the suite (tests/redteam), which is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redteam.catalog import load_catalog
from redteam.report import SECURITY_DOC, load_record, render_document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the document is stale")
    args = parser.parse_args(argv)
    current = SECURITY_DOC.read_text(encoding="utf-8")
    rendered = render_document(current, load_record(), load_catalog())
    if args.check:
        if rendered != current:
            print(f"{SECURITY_DOC} is stale: run scripts/redteam_report.py", file=sys.stderr)
            return 1
        return 0
    SECURITY_DOC.write_text(rendered, encoding="utf-8")
    print(f"wrote {SECURITY_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
