"""Who owns a task container and until when: the labels, and the judgement of the sweep.

Owns: the ``io.sandbox-runner.*`` label names, the labels every container we make
carries (:func:`ownership_labels`: owner runner id, boot id, task id or ``pool``,
creation time, deadline, seccomp profile hash, the owning process), and
:func:`is_leftover`, the rule by which a start-up or periodic sweep removes a
container: an earlier boot of this runner whose process is gone, or anybody's
container well past its deadline. The Docker backend puts these on its containers
as labels; the OCI backend keeps the same mapping in its state records, so one rule
sweeps both.

No I/O but reading ``/proc/<pid>/stat`` to tell a live process from a reused pid.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

LABEL = "io.sandbox-runner"
LABEL_MANAGED = f"{LABEL}.managed"
LABEL_OWNER = f"{LABEL}.owner"
LABEL_BOOT = f"{LABEL}.boot"
LABEL_TASK = f"{LABEL}.task"
LABEL_CREATED = f"{LABEL}.created-at"
LABEL_DEADLINE = f"{LABEL}.deadline"
LABEL_POLICY = f"{LABEL}.seccomp-sha256"
LABEL_PROCESS = f"{LABEL}.process"
# Pool slots: the task label says "pool" (the task is not known yet), this one the key.
LABEL_POOL = f"{LABEL}.pool"
POOL_TASK_LABEL = "pool"
# A container whose deadline passed this long ago is an orphan, whoever owns it.
ORPHAN_MARGIN_S = 60.0


def process_identity(pid: int) -> str | None:
    """``pid:start-time`` of a live process (start time defeats pid reuse), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after ')'.
    fields = stat.rpartition(")")[2].split()
    return f"{pid}:{fields[19]}" if len(fields) > 19 else None


def is_alive_identity(identity: str) -> bool:
    """Is the process named by a :func:`process_identity` string still the one alive?"""
    pid, _, _ = identity.partition(":")
    return pid.isdigit() and process_identity(int(pid)) == identity


def ownership_labels(
    *,
    runner_id: str,
    boot_id: str,
    process: str,
    policy_sha256: str,
    deadline: float,
    now: float,
    task_id: str | None = None,
    pool_key: str | None = None,
) -> dict[str, str]:
    """The labels of one container: ``task_id`` for a task's, ``pool_key`` for a slot's."""
    labels = {
        LABEL_MANAGED: "true",
        LABEL_OWNER: runner_id,
        LABEL_BOOT: boot_id,
        LABEL_TASK: task_id or POOL_TASK_LABEL,
        LABEL_CREATED: datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        LABEL_DEADLINE: f"{deadline:.0f}",
        LABEL_POLICY: policy_sha256,
        LABEL_PROCESS: process,
    }
    if pool_key is not None:
        labels[LABEL_POOL] = pool_key[:16]
    return labels


def is_leftover(labels: dict[str, str], *, runner_id: str, boot_id: str, now: float) -> bool:
    """Should a sweep by ``runner_id`` (this boot: ``boot_id``) remove this container?

    Yes for an earlier run of this runner whose process is gone (a concurrent ``exec``
    with the same runner id is alive and keeps its containers), and for any container
    whose deadline passed more than :data:`ORPHAN_MARGIN_S` ago, or that has none.
    """
    stale_boot = (
        labels.get(LABEL_OWNER) == runner_id
        and labels.get(LABEL_BOOT) != boot_id
        and not is_alive_identity(labels.get(LABEL_PROCESS, ""))
    )
    try:
        past_deadline = float(labels.get(LABEL_DEADLINE, "0")) + ORPHAN_MARGIN_S < now
    except ValueError:
        past_deadline = True
    return stale_boot or past_deadline
