"""Write ``examples/oci-backend/runner-seccomp.json``: the seccomp profile of a runner
*container* that runs the OCI backend (not of a task container: tasks keep
``policies/seccomp/task.json``, which runc applies to them inside).

It is Docker's own default profile (``policies/reference/docker-default-seccomp.json``,
Docker 20.10's) plus the two system calls runc needs that it refuses even with
CAP_SYS_ADMIN, measured one by one on the reference host (docs/operations.md):

- ``keyctl``: runc gives every container its own session keyring;
- ``pivot_root``: runc moves the container into its root filesystem.

With the capabilities docs/operations.md lists, nothing else was refused.

    python scripts/runner_seccomp.py          # write it
    python scripts/runner_seccomp.py --check  # exit 1 when the file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DEFAULT = ROOT / "policies" / "reference" / "docker-default-seccomp.json"
OUTPUT = ROOT / "examples" / "oci-backend" / "runner-seccomp.json"
RUNC_NEEDS = ("keyctl", "pivot_root")


def profile() -> dict[str, Any]:
    """Docker's default profile with one more rule: what runc needs, allowed."""
    base: dict[str, Any] = json.loads(DOCKER_DEFAULT.read_text(encoding="utf-8"))
    base["syscalls"].append(
        {
            "names": list(RUNC_NEEDS),
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "comment": "runc (the OCI backend): a session keyring per container, "
            "pivot_root into its root filesystem",
            "includes": {},
            "excludes": {},
        }
    )
    return base


def render() -> str:
    return json.dumps(profile(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != render():
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python {Path(__file__).name}")
            return 1
        return 0
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
