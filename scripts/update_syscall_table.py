"""Regenerate ``policies/reference/syscalls.json`` from the Linux UAPI headers.

Reference data for ``sandbox-runner policy lint``/``explain``: which system-call
names exist on x86_64 and aarch64, and their numbers. It is not policy. Needs the
``linux-libc-dev`` headers and ``cpp`` (both on Debian 12 by default for a build
host); the stored file was made from linux-libc-dev 6.1.

    python scripts/update_syscall_table.py
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "policies" / "reference" / "syscalls.json"
X86_64_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
# arm64's own asm/unistd.h defines these before including the generic table.
AARCH64_PRELUDE = (
    "#define __BITS_PER_LONG 64\n"
    "#define __ARCH_WANT_RENAMEAT\n"
    "#define __ARCH_WANT_NEW_STAT\n"
    "#define __ARCH_WANT_SET_GET_RLIMIT\n"
    "#define __ARCH_WANT_SYS_CLONE3\n"
    "#define __ARCH_WANT_MEMFD_SECRET\n"
    "#include <asm-generic/unistd.h>\n"
)
NOT_CALLS = {"syscalls", "arch_specific_syscall"}


def x86_64() -> dict[str, int]:
    table: dict[str, int] = {}
    for line in X86_64_HEADER.read_text().splitlines():
        match = re.match(r"#define __NR_(\w+)\s+(\d+)$", line.strip())
        if match:
            table[match.group(1)] = int(match.group(2))
    return table


def aarch64() -> dict[str, int]:
    macros = subprocess.run(
        ["cpp", "-dM", "-P", "-"], input=AARCH64_PRELUDE, capture_output=True, text=True, check=True
    ).stdout
    defines = dict(re.findall(r"^#define (__NR\w+) (.+)$", macros, re.M))

    def evaluate(value: str) -> int:
        value = value.strip("() ")
        if value.isdigit():
            return int(value)
        if value in defines:
            return evaluate(defines[value])
        base, plus, offset = value.partition("+")
        if plus:
            return evaluate(base) + int(offset)
        raise ValueError(value)

    return {
        name[len("__NR_") :]: evaluate(value)
        for name, value in defines.items()
        if name.startswith("__NR_") and name[len("__NR_") :] not in NOT_CALLS
    }


def main() -> None:
    document = {
        "comment": "Reference data, not policy: system-call names and numbers per native "
        "architecture, from the Linux 6.1 UAPI headers (linux-libc-dev). Regenerate with "
        "scripts/update_syscall_table.py.",
        "x86_64": dict(sorted(x86_64().items())),
        "aarch64": dict(sorted(aarch64().items())),
    }
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
