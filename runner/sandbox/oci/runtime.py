"""An OCI runtime driven directly: ``runc``, ``crun`` or ``runsc`` (gVisor).

Owns: finding the runtime the settings name (``runc``, ``crun``, ``runsc`` or a path),
whether it can run task containers on this host and, if not, why (not root, a
cgroup layout it refuses, no cgroups we may write), the command lines of a
container's life under our own state root (``--root``): run detached with the
container's stdin, stdout and stderr handed over as descriptors, kill, delete,
list, state, and turning a failed command into :class:`RuntimeFailure` with what
the runtime said.

Blocking: every method runs a short subprocess; callers are in worker threads.
No other module runs a runtime binary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.sandbox.oci import cgroups

RUNTIMES = ("runc", "crun", "runsc")
COMMAND_TIMEOUT_S = 30.0
# What a runtime said when it failed, kept for the error (its last lines).
STDERR_KEPT = 2000


class RuntimeFailure(Exception):
    """A runtime command failed: its arguments, exit status and what it printed."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        super().__init__(f"{' '.join(argv[:1] + argv[3:])}: {stderr.strip() or returncode}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class OciRuntime:
    """One runtime binary with our state root; ``kind`` is runc, crun or runsc."""

    kind: str
    path: str
    root: Path

    def argv(self, *args: str) -> list[str]:
        base = [self.path, "--root", str(self.root)]
        if self.kind == "runsc":
            # gVisor's own network stack is not started at all: the task gets none; and
            # our seccomp profile is applied inside the sandbox too (by gVisor's kernel,
            # to the task's calls): off by default in runsc, a layer we keep.
            base += ["--network=none", "--oci-seccomp"]
        return [*base, *args]

    def _run(self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        argv = self.argv(*args)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeFailure(argv, None, f"no answer within {timeout_s:.0f} s") from exc
        if done.returncode != 0:
            raise RuntimeFailure(argv, done.returncode, done.stderr[-STDERR_KEPT:])
        return done.stdout

    def run_detached(
        self,
        container_id: str,
        bundle: Path,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        pid_file: Path,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        """Create and start the container; its stdio are the three descriptors given
        (the runtime passes them through and exits, leaving the container running).

        What the runtime says when it fails goes to ``stderr`` too: the caller holds
        its read end and reads it into the :class:`RuntimeFailure` (``stderr`` here is
        empty). Never read ``stderr`` to its end here: the container keeps it open.
        """
        detach = "--detach" if self.kind == "runsc" else "-d"
        argv = self.argv(
            "run", detach, "--pid-file", str(pid_file), "--bundle", str(bundle), container_id
        )
        process = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            returncode = process.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            process.wait()
            raise RuntimeFailure(argv, None, f"no answer within {timeout_s:.0f} s") from exc
        if returncode != 0:
            raise RuntimeFailure(argv, returncode, "")

    def kill(self, container_id: str, signal: str = "KILL") -> None:
        self._run("kill", container_id, signal)

    def delete(self, container_id: str, *, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        """Delete the container (killed first if it still runs), its state and cgroup."""
        self._run("delete", "--force", container_id, timeout_s=timeout_s)

    def forget_exited(self, container_id: str) -> bool:
        """What ``delete`` does for a container whose init has exited and been reaped,
        without starting the runtime (a Go process, ~6 ms of CPU per task): remove its
        state directory. runc only, whose layout is one directory per container under
        ``--root`` and whose ``delete`` of a stopped container does no more than that
        and remove the cgroups (ours to remove, and removed by the caller) -- no hooks
        run: our specs have none. False when this runtime has no such shortcut (crun,
        runsc: their ``delete`` does more) or the directory is not there; the caller
        then deletes through the runtime."""
        if self.kind != "runc":
            return False
        state = self.root / container_id
        if container_id in ("", ".", "..") or "/" in container_id or not state.is_dir():
            return False
        shutil.rmtree(state)
        return True

    def state(self, container_id: str) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = json.loads(self._run("state", container_id))
        except RuntimeFailure:
            return None
        return answer

    def list_ids(self) -> list[str]:
        """Every container in our state root (whatever its state)."""
        if not self.root.exists():
            return []
        return [
            entry["id"]
            for entry in json.loads(self._run("list", "--format", "json") or "null") or []
        ]

    def version(self) -> str:
        """The runtime's first version line (``runc version 1.1.5+ds1``)."""
        try:
            done = subprocess.run(
                [self.path, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return (done.stdout.strip().splitlines() or ["unknown"])[0]


def find_runtime(choice: str) -> tuple[str, str] | None:
    """``(kind, path)`` of the runtime named by a setting (a name or a path), or None."""
    if "/" in choice:
        path = Path(choice)
        if not (path.is_file() and os.access(path, os.X_OK)):
            return None
        name = path.name
        kind = next((k for k in RUNTIMES if name.startswith(k)), "runc")
        return kind, str(path)
    if choice not in RUNTIMES:
        return None
    found = shutil.which(choice) or shutil.which(choice, path="/usr/sbin:/usr/local/sbin:/sbin")
    return (choice, found) if found else None


def why_not(kind: str) -> str | None:
    """Why task containers cannot run with a ``kind`` runtime here, or None if they can."""
    if os.geteuid() != 0:
        return "the OCI backend needs root (it creates namespaces and cgroups itself)"
    layout = cgroups.layout()
    if layout == "none":
        return "no cgroup file system is mounted at /sys/fs/cgroup"
    if not cgroups.writable():
        return "the cgroup file system is not writable here (a container without cgroup access?)"
    if kind == "crun" and layout == "hybrid":
        # Debian 12's crun 1.8.1: "cgroups in hybrid mode not supported".
        return (
            "crun refuses this host's hybrid cgroup layout (cgroup v1 controllers with a "
            "v2 hierarchy beside them); use runc here, or crun on a pure cgroup v2 host"
        )
    return None
