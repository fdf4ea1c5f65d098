"""The red-team catalog: every probe file, what it attacks, and what must happen.

A probe is one file under ``probes/<class>/<name>.py``: the body of a Python Code
node (it may ``return``), opened by a header of ``#`` comments that this module
parses, so that a new bypass report is one new file::

    # title: subclasses walk from a tuple to os._wrap_close's globals
    # threat: py.introspection
    # expect default: security_violation@analyze "Access to attribute '__subclasses__'"
    # expect guards_off: success {"uid": 10001, "etc_write": "EROFS"}
    # expect ablation: success {...}            (kernel-and-container probes only)
    # layers: caps, nnp                         (what still blocks it under ablation)
    # ours: refuses                             (does our seccomp profile refuse it too?)
    # limits: {"timeout_s": 3, "pids": 32}     (optional: Limits fields)
    # action: cancel-after 1.0                  (optional: the harness cancels the task)
    # note: free text, kept for the docs

An expectation names exactly one outcome per mode. ``success`` is followed by the
exact JSON the task must return; any other outcome (the stable error code, with an
optional ``@stage``) by a JSON string that must occur in the error's message or
description. Nothing here is "either of two outcomes".

Where the outcome depends on the host rather than on the container, a header line
is keyed on a *host fact* (:data:`HOST_FACTS`, detected by :func:`detect_host_facts`
from the test process, independently of the runner)::

    # expect ablation when kcore=no: success {"/proc/kcore": "ENOENT", ...}
    # expect ablation when kcore=yes: success {"/proc/kcore": 0, ...}
    # layers when kcore=no: masked, uid, kernel

A line may also say ``unjudged "why"``: on hosts it applies to, the probe runs and is
recorded but not judged, for the reason given (an outcome known to vary there).

A line may name several facts (``when cgroup=v1,runtime=gvisor``): it applies when
all hold, and of the lines that apply, the one naming the most facts is in force, so
an unkeyed line is the default that a keyed one refines (``when runtime=gvisor``: the
engine's runtime is a fact too, set per engine by the suite).

The line whose fact matches this host is the one in force. Where no line matches
(the expectation was never established on a host with that fact), the mode is
*not judged here*: the probe still runs in it and its outcome is recorded, but no
outcome can be right or wrong, and the suite says how many such runs there were
and why (:attr:`Probe.unjudged`), instead of failing with a confusing mismatch or
skipping in silence. A ``layers`` line with no match leaves the layers unknown.
The probes call x86_64 system call numbers: the catalog refuses any other machine.

Modes (each one pipeline through the real Docker engine):

- ``default``: the policy as shipped (guards on, our seccomp profile);
- ``guards_off``: every in-process guard off (imports ``*``, no builtins denied,
  environment readable), so the container alone must hold;
- ``ablation``: guards off *and* our seccomp profile swapped for Docker's default
  (kernel-and-container probes only): what still blocks the probe is what the
  ``layers`` line names.

Imports nothing from ``runner`` but the outcome names, so that
``scripts/redteam_report.py`` can load it cheaply.
"""

from __future__ import annotations

import json
import platform
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROBE_DIR = HERE / "probes"
LAST_RUN = HERE / "last_run.json"
# The engines the suite runs on: Docker (runc under dockerd), the OCI backend driving
# runc itself, and the gVisor tier (runsc). Each has its tracked record.
ENGINES = ("docker", "oci", "gvisor")
ENGINE_TITLES = {
    "docker": "runc via Docker",
    "oci": "runc direct (OCI backend)",
    "gvisor": "gVisor (runsc)",
}
# The OCI runtime under each engine: what a probe's "when runtime=..." lines key on.
ENGINE_RUNTIME = {"docker": "runc", "oci": "runc", "gvisor": "gvisor"}


def last_run(engine: str) -> Path:
    """The tracked record of the last run on ``engine``."""
    return LAST_RUN if engine == "docker" else HERE / f"last_run.{engine}.json"


MODES = ("default", "guards_off", "ablation")
MODE_TITLES = {
    "default": "default policy",
    "guards_off": "guards off",
    "ablation": "guards off + Docker's default seccomp",
}

# The three classes of THREATS.md, in its order; the folder name of each.
CLASSES = {
    "python_level": "Python level",
    "resources": "Resources and lifecycle",
    "kernel": "Kernel and container",
}

# Every bullet of THREATS.md's classes (short tag -> class, text).
THREATS: dict[str, tuple[str, str]] = {
    "py.introspection": (
        "python_level",
        "introspection walks to os or builtins (subclasses, __globals__, __builtins__, "
        "__self__, __wrapped__, __closure__, descriptors, __dict__)",
    ),
    "py.runtime-names": (
        "python_level",
        "attribute names built at run time (getattr, concatenation, chr, bytes.decode, join), "
        "format-string attribute traversal (str.format, format_map, string.Formatter)",
    ),
    "py.frames": (
        "python_level",
        "frames and tracebacks (gi_frame, cr_frame, f_back, f_globals, tb_frame, "
        "sys._getframe), pattern matching on exception attributes",
    ),
    "py.dynamic-import": (
        "python_level",
        "dynamic import (__import__ with a computed name, importlib, loaders, sys.modules), "
        "relative imports, modules outside the allowlist, gadgets inside allowed modules "
        "(pickle, marshal, ctypes, gc, inspect)",
    ),
    "py.secrets": (
        "python_level",
        "secrets: os.environ, /proc/self/environ, /proc/1/environ, files the image ships, "
        "the broker token",
    ),
    "res.bombs": (
        "resources",
        "memory bomb, fork bomb, thread bomb, CPU spin with SIGTERM ignored, double-fork "
        "daemon that outlives the task, deep recursion and C-stack crashes",
    ),
    "res.disk-output": (
        "resources",
        "disk and inode exhaustion, single huge file, output flood on stdout/stderr and on "
        "the result channel, spoofed result frames printed to stdout",
    ),
    "res.lifecycle": (
        "resources",
        "the runner killed mid-task, the Docker daemon restarted mid-task, the broker gone "
        "mid-task: no leaked containers, no task reported twice, no task lost silently",
    ),
    "k.proc-sys": (
        "kernel",
        "/proc and /sys writes and reads that leak host data, cgroup release_agent, "
        "the Docker socket",
    ),
    "k.syscalls": (
        "kernel",
        "ptrace and process_vm_* against the agent, mount and the new mount API, unshare and "
        "namespace-creating clone flags, keyctl, userfaultfd, io_uring, bpf, perf_event_open, "
        "personality and legacy syscall ABIs",
    ),
    "k.sockets": (
        "kernel",
        "raw and packet sockets, netlink, vsock, AF_ALG, the network itself",
    ),
    "k.cross-task": (
        "kernel",
        "cross-task channels: shared memory, SysV IPC, abstract unix sockets, keyrings, "
        "leftover files in a reused container",
    ),
    "k.over-capable": (
        "kernel",
        "privileged or over-capable containers (capabilities, host network, pid, ipc, host mounts)",
    ),
}

# What may still stop a probe once our seccomp profile is swapped for Docker's.
LAYERS: dict[str, str] = {
    "docker-seccomp": "Docker's default seccomp profile",
    "caps": "all capabilities dropped",
    "nnp": "no-new-privileges",
    "rootfs": "read-only root filesystem (and Docker's read-only /proc, /sys paths)",
    "masked": "Docker's masked /proc and /sys paths",
    "network": "network none (own network namespace, only lo)",
    "ipcns": "private IPC namespace (ipc_mode none)",
    "pidns": "own PID namespace",
    "cgroups": "cgroup limits (memory, pids, cpu)",
    "uid": "non-root uid 10001 (no user-namespace remap on this host)",
    "tmpfs": "noexec, nosuid, nodev, size-capped /tmp",
    "agent": "the agent: undumpable, tini execute-only, deadline, output caps",
    "runner": "the runner: frame validation, host deadline, output cap, fresh container",
    "config": "container configuration (no host mounts, no Docker socket)",
    "kernel": "host kernel settings (sysctls, built without the feature)",
}

# The probes hard-code system call numbers of this ABI (272 unshare, 425 io_uring_setup...).
REFERENCE_MACHINE = "x86_64"

# What the host contributes to some outcomes, each detected here, not asked of the runner.
HOST_FACTS: dict[str, str] = {
    "machine": "platform.machine() of the test process",
    "vsock": "virtio: /dev/vsock exists and the virtio vsock transport drives a device (a "
    "VM; the reference host is a Firecracker VM); other: /dev/vsock, another transport; "
    "no: no /dev/vsock",
    "af_alg": "an AF_ALG socket can be created in the test process (kernel built with it)",
    "kcore": "/proc/kcore exists",
    "io_uring_disabled": "/proc/sys/kernel/io_uring_disabled (absent: 'absent')",
    "userns": "unprivileged user namespaces possible: /proc/sys/user/max_user_namespaces > 0",
    "cgroup": "v2: the unified hierarchy at /sys/fs/cgroup (cgroup.controllers there), so task "
    "containers see cgroup v2; v1: v1 hierarchies (hybrid hosts included)",
    "runtime": "the OCI runtime under the task: runc (Docker's, and the OCI backend's) or "
    "gvisor (runsc: another kernel between the task and the host); set per engine by the "
    "suite, runc unless it says otherwise",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return None


def _af_alg_available() -> bool:
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    except OSError:
        return False
    return True


def detect_host_facts(root: Path = Path("/"), *, af_alg: bool | None = None) -> dict[str, str]:
    """The host facts of :data:`HOST_FACTS`, from this (the test) process.

    ``root`` and ``af_alg`` stand in for the host's file system and socket families
    (tests simulate other hosts with them); by default, this host's own.
    """
    if af_alg is None:
        af_alg = _af_alg_available()
    max_userns = _read(root / "proc/sys/user/max_user_namespaces")
    vsock = "no"
    if (root / "dev/vsock").exists():
        vsock = "other"
        virtio = root / "sys/bus/virtio/drivers/vmw_vsock_virtio_transport"
        if virtio.is_dir() and any(p.name.startswith("virtio") for p in virtio.iterdir()):
            vsock = "virtio"
    return {
        "machine": platform.machine(),
        "vsock": vsock,
        "af_alg": "yes" if af_alg else "no",
        "kcore": "yes" if (root / "proc/kcore").exists() else "no",
        "io_uring_disabled": _read(root / "proc/sys/kernel/io_uring_disabled") or "absent",
        "userns": "yes" if max_userns is not None and int(max_userns) > 0 else "no",
        "cgroup": "v2" if (root / "sys/fs/cgroup/cgroup.controllers").exists() else "v1",
        "runtime": "runc",
    }


def machine_problem(facts: dict[str, str]) -> str | None:
    """Why the probes cannot run on this machine, or None."""
    if facts.get("machine") == REFERENCE_MACHINE:
        return None
    return (
        f"the red-team probes call {REFERENCE_MACHINE} system call numbers (272 unshare, "
        f"425 io_uring_setup, 248 add_key...); this machine is {facts.get('machine')!r}, "
        "where those numbers are other calls: every expectation would be meaningless. "
        f"Run tests/redteam on an {REFERENCE_MACHINE} host."
    )


# ``# expect MODE when FACTS: unjudged "why"``: the outcome there is known not to be one.
UNJUDGED = "unjudged"
_HEADER = re.compile(r"^#\s*([a-z_]+)(?:\s+([a-z_]+))?(?:\s+when\s+([a-z0-9_=,]+))?\s*:\s*(.*)$")
_OUTCOME = re.compile(r"^([a-z_]+)(?:@([a-z]+))?\s*(.*)$")


class CatalogError(ValueError):
    """A probe file whose header cannot be read."""


@dataclass(frozen=True)
class Expect:
    """One mode's expected outcome of one probe."""

    outcome: str
    stage: str | None = None
    fragment: str | None = None  # for errors: in message or description
    result: Any = None  # for success: the exact JSON returned

    def describe(self) -> str:
        if self.outcome == "success":
            return "success " + json.dumps(self.result, sort_keys=True)
        stage = f"@{self.stage}" if self.stage else ""
        return f"{self.outcome}{stage} {json.dumps(self.fragment)}"

    def mismatches(self, observed: dict[str, Any]) -> list[str]:
        """What differs between this expectation and an observation (empty: it holds)."""
        problems = []
        if observed.get("outcome") != self.outcome:
            problems.append(f"outcome {observed.get('outcome')!r}, expected {self.outcome!r}")
        if self.stage and observed.get("stage") != self.stage:
            problems.append(f"stage {observed.get('stage')!r}, expected {self.stage!r}")
        if self.outcome == "success":
            if observed.get("result") != self.result:
                problems.append(
                    f"result {json.dumps(observed.get('result'), sort_keys=True)}, "
                    f"expected {json.dumps(self.result, sort_keys=True)}"
                )
        else:
            text = f"{observed.get('message', '')}\n{observed.get('description', '')}"
            if self.fragment is not None and self.fragment not in text:
                problems.append(f"{self.fragment!r} not in the error: {text[:400]!r}")
        return problems


@dataclass(frozen=True)
class Probe:
    path: Path
    klass: str
    name: str
    title: str
    threat: str
    expects: dict[str, Expect]
    code: str
    layers: tuple[str, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    action: tuple[str, float] | None = None
    note: str = ""
    # Does our own seccomp profile refuse the attack too (so that, with our profile,
    # it is one layer more than under Docker's)? Stated for kernel probes held by
    # at most one layer under Docker's default profile.
    ours_refuses: bool | None = None
    # Modes whose expectation was never established on a host with this one's facts:
    # mode -> why. They run and are recorded, but not judged.
    unjudged: dict[str, str] = field(default_factory=dict)
    # Why the layers line has no value for this host (None: it has one).
    layers_unknown: str | None = None

    @property
    def id(self) -> str:
        return f"{self.klass}/{self.name}"

    @property
    def modes(self) -> tuple[str, ...]:
        """Every mode the probe runs in, judged here or not."""
        return tuple(mode for mode in MODES if mode in self.expects or mode in self.unjudged)


def _conditions(text: str | None, where: str) -> dict[str, str]:
    """``fact=value,fact=value`` -> {fact: value}."""
    if not text:
        return {}
    wanted = {}
    for part in text.split(","):
        fact, equals, value = part.partition("=")
        if not equals or not fact or not value:
            raise CatalogError(f"{where}: cannot read the condition {part!r}")
        wanted[fact] = value
    return wanted


def _parse_expect(text: str, where: str) -> Expect:
    match = _OUTCOME.match(text.strip())
    if match is None:
        raise CatalogError(f"{where}: cannot read expectation {text!r}")
    outcome, stage, rest = match.groups()
    try:
        value = json.loads(rest) if rest else None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{where}: {exc}: {rest!r}") from exc
    if outcome == "success":
        return Expect(outcome, stage, result=value)
    if not isinstance(value, str) or not value:
        raise CatalogError(f"{where}: an error expectation needs a message fragment")
    return Expect(outcome, stage, fragment=value)


def load_probe(path: Path, facts: dict[str, str]) -> Probe:
    """One probe file, with the lines keyed on host facts resolved against ``facts``."""
    klass = path.parent.name
    where = f"{klass}/{path.name}"
    if klass not in CLASSES:
        raise CatalogError(f"{where}: unknown class folder {klass!r}")
    fields: dict[str, str] = {}
    expects: dict[str, Expect] = {}
    # (key, mode) -> its lines: (conditions, value); a line applies when all its
    # conditions hold, and the most specific line that applies is the one in force.
    lines: dict[tuple[str, str | None], list[tuple[dict[str, str], str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER.match(line)
        if match is None:
            continue
        key, mode, conditions, value = match.groups()
        wanted = _conditions(conditions, where)
        for fact in wanted:
            if fact not in HOST_FACTS or fact not in facts:
                raise CatalogError(f"{where}: unknown host fact {fact!r}")
        if wanted and key not in ("expect", "layers"):
            raise CatalogError(f"{where}: only expect and layers lines may be keyed on facts")
        if key == "expect" and mode not in MODES:
            raise CatalogError(f"{where}: unknown mode {mode!r}")
        lines.setdefault((key, mode), []).append((wanted, value))
    unjudged: dict[str, str] = {}
    layers_unknown = None
    for (key, mode), candidates in lines.items():
        applying = [
            (wanted, value)
            for wanted, value in candidates
            if all(facts[fact] == expected for fact, expected in wanted.items())
        ]
        what = f"{key} {mode}" if mode else key
        if applying:
            most = max(len(wanted) for wanted, _ in applying)
            chosen = [value for wanted, value in applying if len(wanted) == most]
            if key == "expect":
                if len(chosen) > 1:
                    raise CatalogError(f"{where}: two '{what}' lines apply to {facts}")
                if chosen[0].startswith(UNJUDGED + " "):
                    # Said outright: no single outcome can be established here.
                    unjudged[str(mode)] = json.loads(chosen[0].removeprefix(UNJUDGED + " "))
                else:
                    expects[str(mode)] = _parse_expect(chosen[0], where)
            else:
                fields[key] = " ".join(chosen)  # a note may run over several lines
            continue
        established = " or ".join(
            ", ".join(f"{fact}={expected}" for fact, expected in wanted.items())
            for wanted, _ in candidates
        )
        have = ", ".join(
            f"{fact}={facts[fact]}"
            for fact in sorted({fact for wanted, _ in candidates for fact in wanted})
        )
        reason = (
            f"its '{what}' line is established only where {established}; this host has "
            f"{have} (to judge it here: run the probe, see what holds it, and add a "
            f"'# {what} when {have.replace(', ', ',')}: ...' line)"
        )
        if key == "expect":
            unjudged[str(mode)] = reason
        elif key == "layers":
            layers_unknown = reason
    threat = fields.get("threat", "")
    if threat not in THREATS or THREATS[threat][0] != klass:
        raise CatalogError(f"{where}: threat {threat!r} is not a bullet of class {klass}")
    required = MODES if klass == "kernel" else MODES[:2]
    if set(expects) | set(unjudged) != set(required) or set(expects) & set(unjudged):
        raise CatalogError(f"{where}: needs exactly the expectations {required}")
    layers = tuple(item.strip() for item in fields.get("layers", "").split(",") if item.strip())
    if klass == "kernel" and "layers" not in fields and layers_unknown is None:
        raise CatalogError(f"{where}: a kernel-and-container probe needs a layers line")
    unknown = set(layers) - set(LAYERS) - {"none"}
    if unknown:
        raise CatalogError(f"{where}: unknown layers {sorted(unknown)}")
    ours = fields.get("ours")
    if ours not in (None, "refuses", "allows"):
        raise CatalogError(f"{where}: 'ours' is 'refuses' or 'allows', not {ours!r}")
    real_layers = [layer for layer in layers if layer != "none"]
    if klass == "kernel" and len(real_layers) <= 1 and ours is None and layers_unknown is None:
        raise CatalogError(f"{where}: held by at most one layer: say whether ours refuses it")
    action = None
    if "action" in fields:
        verb, _, seconds = fields["action"].partition(" ")
        if verb != "cancel-after":
            raise CatalogError(f"{where}: unknown action {verb!r}")
        action = (verb, float(seconds))
    return Probe(
        path=path,
        klass=klass,
        name=path.stem,
        title=fields.get("title", path.stem),
        threat=threat,
        expects=expects,
        code=path.read_text(encoding="utf-8"),
        layers=tuple(real_layers),
        limits=json.loads(fields["limits"]) if "limits" in fields else {},
        action=action,
        note=fields.get("note", ""),
        ours_refuses=None if ours is None else ours == "refuses",
        unjudged=unjudged,
        layers_unknown=layers_unknown,
    )


def unjudged_runs(probes: list[Probe]) -> list[tuple[str, str, str]]:
    """(probe id, mode, why) of every run whose expectation this host's facts leave open."""
    return [(probe.id, mode, why) for probe in probes for mode, why in probe.unjudged.items()]


def load_catalog(facts: dict[str, str]) -> list[Probe]:
    """Every probe, by class (THREATS.md's order) then name, for a host with ``facts``.

    The suite passes :func:`detect_host_facts`; ``scripts/redteam_report.py`` the facts
    recorded with the run it renders.
    """
    problem = machine_problem(facts)
    if problem is not None:
        raise CatalogError(problem)
    probes = []
    for klass in CLASSES:
        for path in sorted((PROBE_DIR / klass).glob("*.py")):
            probes.append(load_probe(path, facts))
    return probes
