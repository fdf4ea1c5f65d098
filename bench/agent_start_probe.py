"""The in-container half of ``python -m bench.agent_start``: standard library only.

Runs inside a container of the task image (``python3 -I agent_start_probe.py
CONFIG``), started by :mod:`bench.agent_start`, which mounts this file, the
configuration, the framed task envelopes and any extra agent bundle. For every
bundle (a folder with ``run.py`` and ``sandbox_agent/``, the interpreter flags and
the arguments its entrypoint gives) it starts the image's own interpreter again and
again, round-robin across bundles so that a noisy moment costs every bundle alike,
and takes each process's CPU from ``wait4`` (user + sys, its reaped children
included: for an agent that is the forked task child too). Measured:

- ``interpreter``: ``python3 FLAGS -c pass``, the interpreter start alone;
- ``imports``: ``python3 FLAGS -c "<path>; import sandbox_agent.agent"``, start plus
  every module the agent loads before it reads its task;
- ``task:<name>``: the agent itself, ``python3 FLAGS run.py ARGS``, one framed task
  envelope on stdin, its result envelope checked (status and error kind).

Then ``-X importtime`` runs of each task (the agent's imports and its child's, which
writes to the same stderr), raw. Everything is printed as one JSON document; the host
side summarizes it.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from typing import Any

PYTHON = "/usr/bin/python3"
HEADER = struct.Struct(">I")


def run_once(argv: list[str], stdin: bytes) -> tuple[float, bytes, bytes]:
    """(CPU ms of the process and its reaped children, stdout, stderr)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1024)
        os.execv(argv[0], argv)  # noqa: S606 - the image's own python3, our flags
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    # Small envelopes (a few KiB): they fit the pipe buffer, written before reading.
    os.write(in_w, stdin)
    os.close(in_w)
    out, err = read_all(out_r), read_all(err_r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} exited {status}: {err[-2000:].decode(errors='replace')}")
    return (usage.ru_utime + usage.ru_stime) * 1000, out, err


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def result_summary(out: bytes) -> str:
    """``status`` or ``error:<kind>`` of a framed result envelope."""
    (length,) = HEADER.unpack_from(out)
    envelope = json.loads(out[HEADER.size : HEADER.size + length].split(b"\n", 1)[0])
    if envelope["status"] == "success":
        return "success"
    return f"error:{envelope['error']['kind']}"


def commands(bundle: dict[str, Any], tasks: dict[str, bytes]) -> dict[str, list[str]]:
    folder, flags, args = bundle["dir"], bundle["flags"], bundle["args"]
    load = f"import sys; sys.path.insert(0, {folder!r}); import sandbox_agent.agent"
    found = {
        "interpreter": [PYTHON, *flags, "-c", "pass"],
        "imports": [PYTHON, *flags, "-c", load],
    }
    for name in tasks:
        found[f"task:{name}"] = [PYTHON, *flags, f"{folder}/run.py", *args]
    return found


def main(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    tasks = {}
    for name, path in config["tasks"].items():
        with open(path, "rb") as handle:
            tasks[name] = handle.read()
    bundles = config["bundles"]
    samples: dict[str, dict[str, list[float]]] = {b["name"]: {} for b in bundles}
    results: dict[str, dict[str, str]] = {b["name"]: {} for b in bundles}
    started = time.monotonic()
    for _ in range(config["runs"]):
        for bundle in bundles:
            for what, argv in commands(bundle, tasks).items():
                stdin = tasks[what[5:]] if what.startswith("task:") else b""
                cpu_ms, out, _ = run_once(argv, stdin)
                samples[bundle["name"]].setdefault(what, []).append(cpu_ms)
                if what.startswith("task:"):
                    results[bundle["name"]][what] = result_summary(out)
    importtime: dict[str, dict[str, list[str]]] = {b["name"]: {} for b in bundles}
    for _ in range(config["importtimeRuns"]):
        for bundle in bundles:
            for name, stdin in tasks.items():
                argv = [PYTHON, *bundle["flags"], "-X", "importtime", f"{bundle['dir']}/run.py"]
                _, _, err = run_once([*argv, *bundle["args"]], stdin)
                importtime[bundle["name"]].setdefault(name, []).append(err.decode())
    json.dump(
        {
            "python": sys.version.split()[0],
            "seconds": round(time.monotonic() - started, 1),
            "samples": samples,
            "results": results,
            "importtime": importtime,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(sys.argv[1])
