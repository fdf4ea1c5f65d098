"""Write the red-team tables of docs/security.md from the last recorded run.

``REDTEAM_RECORD=1 .venv/bin/pytest tests/redteam`` records every probe's outcome per
mode in ``tests/redteam/last_run.json`` (without the variable, the suite records
into its session's temporary directory only, leaving the tree clean); this script
renders that record (and the probe catalog's layer analysis, resolved for the host
facts recorded with the run) into the generated blocks of ``docs/security.md``.

    .venv/bin/python scripts/redteam_report.py           # rewrite the blocks
    .venv/bin/python scripts/redteam_report.py --check   # exit 1 if they are stale

``--check`` runs in the suite (``tests/redteam/test_probes.py``), which also checks
that its own run observed the same outcomes as the record (never the host line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The catalog lives with the suite (tests/redteam), which is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redteam.catalog import load_catalog
from redteam.report import (
    SECURITY_DOC,
    load_record,
    load_records,
    record_facts,
    render_document,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the document is stale")
    args = parser.parse_args(argv)
    current = SECURITY_DOC.read_text(encoding="utf-8")
    record = load_record()
    records = load_records()
    probes_of = {engine: load_catalog(record_facts(r)) for engine, r in records.items()}
    rendered = render_document(
        current, record, load_catalog(record_facts(record)), (records, probes_of)
    )
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
