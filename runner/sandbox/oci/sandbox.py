"""``OciSandbox``: task containers made by an OCI runtime directly, no daemon on the path.

Owns what is the OCI backend's in a task container's life (the rest, shared with the
Docker backend, is :class:`~runner.sandbox.container.ContainerSandbox`):

- a **bundle** per container under the runner's state directory (``bundles/<id>``):
  the ``config.json`` rendered from the same
  :class:`~runner.sandbox.spec.ContainerSpec` as Docker's create request
  (:mod:`runner.sandbox.oci.config`), over the image unpacked once into a shared,
  read-only root (:mod:`runner.sandbox.oci.rootfs`), and a record of who owns it and
  until when (the labels Docker would carry), which the sweep reads;
- **start**: ``runc run -d`` (or crun, or runsc) with three pipes as the container's
  stdin, stdout and stderr; the runtime exits and the container's PID 1 (tini) stays,
  re-parented to this process, which is its *child subreaper*: so this process alone
  reaps it and learns how it ended (``waitpid``), with a pidfd to wait on;
- the **exchange**: the task envelope into stdin, stdout and stderr read within the
  caps and the host deadline (:class:`~runner.sandbox.stream.Output`), as over
  Docker's attach stream but from two pipes;
- **how it ended**, from the host: the wait status of PID 1 (a PID 1 killed by a
  signal was killed from outside the container, since nothing inside its PID
  namespace can SIGKILL its init; a tini that exited 128+N reports that the agent
  died of signal N, which the task can do, running as the agent's user), and the
  OOM-kill counter of the container's memory cgroup, read on the host before the
  container is deleted;
- the **limits applied**, read on the host from the container's cgroups while it runs
  (for the self-check: under gVisor the task sees none of its cgroups);
- **kill** (SIGKILL to PID 1 through its pidfd: the PID namespace dies with it),
  **removal** (``runc delete --force``, the cgroups, the bundle) and the **sweep** of
  our leftovers by the same rule as Docker's (:func:`runner.sandbox.labels.is_leftover`):
  bundles of dead runners, containers in the runtime's state without a bundle, cgroups
  without either.

Blocking: every method runs in a worker thread (the shared base's rule).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import platform
import select
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ContainerSetupError, ImageBuildError, InfrastructureError
from runner.sandbox.base import AppliedLimits, Limits, SandboxKernel
from runner.sandbox.container import Container, ContainerSandbox, ExitFacts, Run
from runner.sandbox.envelope import encode_task
from runner.sandbox.isolation import IsolationConfig
from runner.sandbox.labels import LABEL_DEADLINE
from runner.sandbox.oci import cgroups
from runner.sandbox.oci.config import etc_binds, etc_files, render
from runner.sandbox.oci.rootfs import GVISOR, Rootfs, RootfsStore, write_json
from runner.sandbox.oci.runtime import OciRuntime, RuntimeFailure
from runner.sandbox.pool import PoolConfig
from runner.sandbox.spec import ContainerSpec, container_spec
from runner.sandbox.stream import STDERR, STDOUT, Output

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 1 << 16
RECORD = "record.json"
# How long a container that was killed, or whose output ended, may take to exit.
EXIT_WAIT_S = 10.0
# Room in a gVisor container's pids cgroup for the sandbox kernel's own threads, and
# for the host threads each of the task's processes costs it: under the ptrace
# platform every address space is a host stub process with threads of its own
# (measured: ~50 host threads for an idle container, ~5 more per sleeping process and
# up to ~10 per process of a fork bomb, which took 370 at 32 processes).
GVISOR_SENTRY_PIDS = 256
GVISOR_PIDS_PER_TASK = 16
# gVisor's own processes (runsc re-executes itself as "exe"), reaped before a delete.
RUNSC_HELPERS = frozenset({"exe", "runsc", "runsc-gofer", "runsc-sandbox"})
HELPER_REAP_ATTEMPTS = 20
HELPER_DELETE_TIMEOUT_S = 10.0
# A bundle without its record this young is being made (the record is written first).
RECORD_GRACE_S = 60.0
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def become_subreaper() -> bool:
    """Make orphaned descendants (a container's PID 1, once the runtime that started it
    exits) children of this process, so that it can reap them and read their status."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class OciContainer(Container):
    """A running container of ours: its PID 1 and our ends of its three pipes."""

    pid: int = 0
    pidfd: int = -1
    stdin: int = -1
    stdout: int = -1
    stderr: int = -1
    bundle: Path = Path()
    cgroups_path: str = ""
    # What the pids cgroup holds beside the task's own limit (gVisor's kernel).
    pids_room: int = 0
    # Set once PID 1 is reaped: its exit code (128 + N for a signal, Docker's way)
    # and whether it was killed by a signal itself.
    exit_code: int | None = None
    signaled: bool = False
    reaped: bool = False

    def close_fds(self) -> None:
        for name in ("stdin", "stdout", "stderr", "pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class OciSandbox(ContainerSandbox[OciContainer]):
    """Runs each task in its own hardened container through an OCI runtime."""

    backend = "oci"
    engine_title = "The OCI runtime"

    def __init__(
        self,
        runtime: OciRuntime,
        store: RootfsStore,
        *,
        image: str,
        isolation: IsolationConfig,
        runner_id: str,
        state_dir: Path,
        setup_attempts: int = 4,
        setup_backoff_max_s: float = 4.0,
        pool: PoolConfig | None = None,
        pool_limits: Limits | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            isolation=isolation,
            runner_id=runner_id,
            setup_attempts=setup_attempts,
            setup_backoff_max_s=setup_backoff_max_s,
            pool=pool,
            pool_limits=pool_limits,
            on_retry=on_retry,
        )
        self._runtime = runtime
        self._store = store
        self._image = image
        self._bundles = state_dir / "bundles"
        self._etc_dir = state_dir / "etc"
        self._etc: dict[str, list[dict[str, Any]]] = {}  # per hostname: its /etc binds
        self._variant = GVISOR if runtime.kind == "runsc" else None
        self._rootfs: Rootfs | None = None
        self._rootfs_lock = threading.Lock()
        self._containers: dict[str, OciContainer] = {}
        self._killed: set[str] = set()  # containers this process killed itself
        # Cgroups the last sweep found with no bundle and no runtime state: their runner.
        self._orphan_cgroups: dict[str, str] = {}
        self._machine = platform.machine()
        self._kernel = platform.release()
        self.is_subreaper = become_subreaper()

    @property
    def runtime(self) -> OciRuntime:
        return self._runtime

    @property
    def kernel(self) -> SandboxKernel:
        return SandboxKernel.GVISOR if self._runtime.kind == "runsc" else SandboxKernel.LINUX

    # -- the image ----------------------------------------------------------------

    def _prepare(self) -> None:
        with self._rootfs_lock:
            self._rootfs = self._store.ensure(self._image, variant=self._variant)
            # A root of an image we no longer use: its containers' bundles keep it
            # from a prune until they are gone; our lease need not.
            self._store.release(keep=[self._rootfs.path])

    def _close(self) -> None:
        with self._rootfs_lock:
            self._store.release()

    def _sweep_blocking(self) -> list[str]:
        """The leftover containers (see :meth:`_list_ours`), then what only they kept:
        per-runner cgroup parents left empty, and unpacked roots that no container's
        bundle names and no live runner leases."""
        removed = super()._sweep_blocking()
        cgroups.remove_empty_parents()
        pruned = self._store.prune(self._roots_in_use())
        if pruned:
            log.info("removed %d unpacked root(s) no container uses", len(pruned))
        return removed

    def _roots_in_use(self) -> set[Path]:
        """The roots every bundle names, and our image's (a runner's start sweeps before
        it leases it: it would unpack it again)."""
        in_use = set()
        with contextlib.suppress(ImageBuildError):
            in_use.add(self._store.path_for(self._image, variant=self._variant))
        if self._bundles.is_dir():
            for bundle in self._bundles.iterdir():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
                    in_use.add(Path(config["root"]["path"]))
        return in_use

    def _root(self) -> Rootfs:
        if self._rootfs is None:
            self._prepare()
        assert self._rootfs is not None
        return self._rootfs

    def _image_ref(self) -> str | None:
        return self._image

    def _memo_salt(self) -> Any:
        return self._rootfs.image_id if self._rootfs else None

    def _shape(self, limits: Limits) -> Any:
        rootfs = self._root()
        spec = self._spec(limits)
        return [rootfs.image_id, self._runtime.kind, dataclasses.asdict(spec)]

    def _spec(self, limits: Limits) -> ContainerSpec:
        """The container for ``limits``.

        Under gVisor the task's processes and threads are tasks of the sandbox kernel
        (the sentry), not host threads: the host's pids cgroup holds the sentry's and
        its gofer's own threads (Go runtimes that die when they cannot start one) and
        the stubs of the task's processes, so it gets room for them beside the task's
        limit (:data:`GVISOR_SENTRY_PIDS`, :data:`GVISOR_PIDS_PER_TASK`), and it does
        not count the task's. What counts those is the sentry's ``RLIMIT_NPROC``, per
        user and, as a sandbox kernel serves one container, per container (under Linux
        it counts the uid's processes on the whole host): set to the task's pids limit,
        it holds the task to the same number of processes and threads as the pids
        cgroup does under runc, and a fork bomb ends with the task's own EAGAIN, not
        with the sandbox kernel dying for want of a thread.
        """
        spec = container_spec(self._isolation, limits)
        if self._runtime.kind == "runsc":
            rlimits = tuple(
                dataclasses.replace(r, soft=min(r.soft, limits.pids), hard=min(r.hard, limits.pids))
                if r.name == "nproc"
                else r
                for r in spec.rlimits
            )
            room = GVISOR_SENTRY_PIDS + GVISOR_PIDS_PER_TASK * limits.pids
            spec = dataclasses.replace(spec, pids=spec.pids + room, rlimits=rlimits)
        return spec

    # -- a container's life -------------------------------------------------------

    def _start(
        self, labels: dict[str, str], limits: Limits, attempt: int, agent_args: tuple[str, ...] = ()
    ) -> OciContainer:
        """Write the bundle, run the container detached with our pipes, open its pidfd.
        On any failure nothing of it is left."""
        t0 = time.monotonic()
        deadline_at = t0 + float(labels[LABEL_DEADLINE]) - time.time()
        rootfs = self._root()
        container_id = f"sbx-{uuid.uuid4().hex[:24]}"
        bundle = self._bundles / container_id
        cgroups_path = cgroups.path_of(self._runner_id, container_id)
        self._bundles.mkdir(parents=True, exist_ok=True, mode=0o700)
        bundle.mkdir(mode=0o700)
        # The record first: a sweep (ours or another runner's) that finds the bundle
        # finds who owns it.
        write_json(bundle / RECORD, {"labels": labels, "cgroupsPath": cgroups_path})
        spec = self._spec(limits)
        image = rootfs.image
        if agent_args:  # after the image's command, as Docker appends a command
            image = dataclasses.replace(image, args=(*image.args, *agent_args))
        config = render(
            spec,
            image,
            rootfs=str(rootfs.path),
            cgroups_path=cgroups_path,
            machine=self._machine,
            kernel_release=self._kernel,
            extra_mounts=self._etc_binds(spec.hostname),
            gvisor=self._runtime.kind == "runsc",
        )
        write_json(bundle / "config.json", config)
        container = OciContainer(
            container_id=container_id,
            started_at=0.0,
            attempts=attempt,
            durations_ms={},
            deadline_at=deadline_at,
            bundle=bundle,
            cgroups_path=cgroups_path,
            pids_room=spec.pids - limits.pids,
        )
        self._containers[container_id] = container
        t1 = time.monotonic()
        stdin_r, container.stdin = os.pipe()
        container.stdout, stdout_w = os.pipe()
        container.stderr, stderr_w = os.pipe()
        try:
            try:
                self._runtime.run_detached(
                    container_id,
                    bundle,
                    stdin=stdin_r,
                    stdout=stdout_w,
                    stderr=stderr_w,
                    pid_file=bundle / "pid",
                )
            finally:
                for fd in (stdin_r, stdout_w, stderr_w):
                    os.close(fd)
            container.pid = int((bundle / "pid").read_text().strip())
            container.pidfd = os.pidfd_open(container.pid)
        except RuntimeFailure as exc:
            said = _read_available(container.stderr)
            self._remove_quietly(container_id)
            raise RuntimeFailure(exc.argv, exc.returncode, exc.stderr or said) from None
        except BaseException:
            self._remove_quietly(container_id)
            raise
        t2 = time.monotonic()
        container.started_at = t2
        container.durations_ms = {"create": (t1 - t0) * 1000, "start": (t2 - t1) * 1000}
        return container

    def _etc_binds(self, hostname: str) -> list[dict[str, Any]]:
        """``/etc/hostname`` and ``/etc/hosts`` for containers named ``hostname``:
        written once under the state directory (whole or not at all: runners share
        it), bound read-only into each container as dockerd binds its own."""
        binds = self._etc.get(hostname)
        if binds is None:
            directory = self._etc_dir / (hostname if hostname.isalnum() else "_")
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            for name, content in etc_files(hostname).items():
                path = directory / name
                with contextlib.suppress(OSError):
                    if path.read_text(encoding="utf-8") == content:
                        continue
                partial = directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                partial.write_text(content, encoding="utf-8")
                partial.chmod(0o644)
                partial.replace(path)
            binds = self._etc[hostname] = etc_binds(str(directory))
        return binds

    def _exchange(self, run: Run[OciContainer]) -> Output:
        """Write the task envelope, then read stdout and stderr until the result, EOF,
        a cap or the deadline; a complete successful frame ends it at once."""
        container = run.container
        assert container is not None
        output = Output.for_output_cap(run.limits.output_bytes)
        deadline = run.deadline
        pending = memoryview(encode_task(run.spec, run.limits))
        readers = {container.stdout: STDOUT, container.stderr: STDERR}
        frame_judged = False
        for fd in (container.stdin, *readers):
            os.set_blocking(fd, False)
        while readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                output.timed_out = True
                break
            writers = [container.stdin] if container.stdin >= 0 else []
            readable, writable, _ = select.select(list(readers), writers, [], remaining)
            if writable:
                try:
                    pending = pending[os.write(container.stdin, pending[:READ_CHUNK]) :]
                except OSError:
                    pending = pending[:0]  # the container is gone; its exit tells why
                if not pending:
                    os.close(container.stdin)  # EOF on the container's stdin
                    container.stdin = -1
            for fd in readable:
                try:
                    chunk = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    del readers[fd]
                    continue
                if output.add(readers[fd], chunk):
                    readers = {}
                    break
            if output.overflow:
                break
            if not frame_judged and output.has_frame():
                # The agent writes its one frame last: a success needs nothing more.
                frame_judged = True
                output.early_result = self._early_result(run, output)
                if output.early_result is not None:
                    break
        if output.timed_out or output.overflow:
            self._kill_quietly(container.container_id)
        return output

    def _wait_exit(self, container: OciContainer) -> int | None:
        """PID 1's exit code (128 + N when it, or the agent under it, died of signal N)."""
        self._reap(container, EXIT_WAIT_S)
        return container.exit_code

    def _reap(self, container: OciContainer, timeout_s: float) -> None:
        """Wait (bounded) for PID 1 to exit and reap it; SIGKILL it if it will not."""
        if container.reaped or container.pid <= 0:
            return
        if container.pidfd >= 0:
            readable, _, _ = select.select([container.pidfd], [], [], timeout_s)
            if not readable:
                self._kill_quietly(container.container_id)
                select.select([container.pidfd], [], [], timeout_s)
        try:
            _, status = os.waitpid(container.pid, 0)
        except ChildProcessError:
            # Not our child (this process is no subreaper): the status is not ours.
            container.reaped = True
            return
        container.reaped = True
        if os.WIFSIGNALED(status):
            container.signaled = True
            container.exit_code = 128 + os.WTERMSIG(status)
        else:
            container.exit_code = os.waitstatus_to_exitcode(status)

    def _applied_limits(self, container: OciContainer) -> AppliedLimits:
        return cgroups.applied_limits(container.cgroups_path, pids_room=container.pids_room)

    def _exit_facts(
        self, container: OciContainer, *, attribute_kill: bool, oom_possible: bool = False
    ) -> ExitFacts:
        """The memory cgroup's OOM kills, counted by the kernel and read here; and who
        killed a PID 1 that died before the agent reported."""
        if (cgroups.oom_kills(container.cgroups_path) or 0) > 0:
            return ExitFacts(oom_killed=True)
        if not attribute_kill or not container.reaped:
            return ExitFacts()
        # Nothing in the container's PID namespace can SIGKILL its init: a signaled
        # PID 1 was killed from outside (an operator; our own kills end as timeout or
        # cancelled before this). A tini that exited 128+N saw the agent die of signal
        # N, which the task (the agent's user) can send.
        outside = container.signaled and container.container_id not in self._killed
        return ExitFacts(outside_kill=outside)

    def _kill(self, container_id: str) -> None:
        self._killed.add(container_id)
        container = self._containers.get(container_id)
        if container is not None and container.pidfd >= 0 and not container.reaped:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(container.pidfd, signal.SIGKILL)
            return
        self._runtime.kill(container_id)

    def _release(self, container: OciContainer) -> None:
        if container.stdin >= 0:
            with contextlib.suppress(OSError):
                os.close(container.stdin)
            container.stdin = -1

    def _remove(self, container_id: str) -> None:
        """Kill and reap PID 1, delete the container (state, cgroups), its bundle."""
        container = self._containers.get(container_id)
        if container is not None:
            if not container.reaped:
                # Through its pidfd (the container is still known to _kill), not the
                # runtime's ``kill``: another process per task, for the same signal.
                self._kill_quietly(container_id)
                self._reap(container, EXIT_WAIT_S)
            container.close_fds()
            self._containers.pop(container_id, None)
        bundle = self._bundles / container_id
        cgroups_path = container.cgroups_path if container else _recorded_cgroups(bundle)
        try:
            if container is None or not container.reaped or not self._forget(container_id):
                self._delete(container_id)
        except RuntimeFailure as exc:
            if "not exist" not in exc.stderr:
                if container is not None:
                    self._containers[container_id] = container
                raise
        if cgroups_path:
            runner_id, _, _ = cgroups_path.removeprefix(f"/{cgroups.PARENT}/").partition("/")
            cgroups.remove(runner_id, container_id)
        elif container_id in self._orphan_cgroups:  # no bundle to say where: the scan did
            runner = self._orphan_cgroups.pop(container_id)
            # Another runner's cgroup is only removed once empty: that runner may be alive
            # with a state directory of its own (its bundles and runtime state are not
            # ours to see), and killing what runs there would end its tasks. Our own
            # runner id's are ours: what still runs there is a crashed run's, killed.
            own = runner == cgroups.path_of(self._runner_id, container_id).split("/")[2]
            cgroups.remove(runner, container_id, kill=own)
        shutil.rmtree(bundle, ignore_errors=True)
        self._killed.discard(container_id)

    def _forget(self, container_id: str) -> bool:
        """A reaped container's runtime state removed without the runtime, where the
        runtime allows it (:meth:`OciRuntime.forget_exited`)."""
        try:
            return self._runtime.forget_exited(container_id)
        except OSError as exc:
            log.debug("could not remove the state of %s: %s", container_id, exc)
            return False

    def _delete(self, container_id: str) -> None:
        """``delete --force``; for gVisor, after reaping its own processes first.

        runsc's sandbox and gofer processes (``exe``: runsc re-executes itself) are
        re-parented to this subreaper when ``runsc run`` exits; once the container
        ends they are zombies that ``runsc delete`` waits for (5 s, then it fails), so
        they are reaped here, again until they all have exited.
        """
        if self._runtime.kind != "runsc":
            self._runtime.delete(container_id)
            return
        for attempt in range(HELPER_REAP_ATTEMPTS):
            _reap_zombie_children(RUNSC_HELPERS)
            try:
                self._runtime.delete(container_id, timeout_s=HELPER_DELETE_TIMEOUT_S)
                return
            except RuntimeFailure:
                if attempt == HELPER_REAP_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)

    def _list_ours(self) -> list[tuple[str, dict[str, str]]]:
        """Bundles with their records; the runtime's containers and our cgroups without
        one are leftovers of a crash (no labels: the sweep removes them)."""
        found: dict[str, dict[str, str]] = {}
        fresh = time.time() - RECORD_GRACE_S
        if self._bundles.is_dir():
            for bundle in self._bundles.iterdir():
                labels = _recorded_labels(bundle)
                with contextlib.suppress(OSError):
                    if not labels and bundle.stat().st_mtime > fresh:
                        continue  # being made right now (its record comes first)
                found[bundle.name] = labels
        with contextlib.suppress(RuntimeFailure):
            for container_id in self._runtime.list_ids():
                found.setdefault(container_id, {})
        # Cgroups with neither a bundle nor runtime state, of any runner: what a
        # removal left half-done (a runner killed in it), or the live containers of a
        # runner with another state directory (_remove kills only in our own runner's
        # cgroups; another's is removed once empty). Not one made in the last
        # minute: a runner making a container writes its bundle, then the runtime
        # makes the cgroup, and this scan may have read the bundles before both.
        self._orphan_cgroups = {
            container_id: runner
            for container_id, (runner, changed) in cgroups.every_container().items()
            if container_id not in found and changed < fresh
        }
        for container_id in self._orphan_cgroups:
            found[container_id] = {}
        return [(cid, labels) for cid, labels in found.items() if cid not in self._containers]

    def _is_slot_alive(self, container: OciContainer) -> bool:
        """Silent until it gets a task: output, EOF or an exit makes a slot unusable."""
        fds = [fd for fd in (container.stdout, container.stderr, container.pidfd) if fd >= 0]
        if len(fds) < 3:
            return False
        try:
            readable, _, _ = select.select(fds, [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # -- faults -------------------------------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, RuntimeFailure):
            return exc.returncode is None  # the runtime did not answer in time
        return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS

    def _retry_cause(self, exc: BaseException | None) -> str:
        if isinstance(exc, RuntimeFailure) and exc.returncode is None:
            return "timeout"
        return "runtime_error"

    def _setup_failed(self, exc: BaseException, what: str) -> InfrastructureError | None:
        if isinstance(exc, RuntimeFailure | OSError):
            return ContainerSetupError(
                f"The OCI runtime ({self._runtime.kind}) could not {what}",
                hint=getattr(exc, "stderr", "").strip()[-500:] or str(exc),
            )
        return None


def _reap_zombie_children(names: frozenset[str]) -> list[int]:
    """Reap this process's exited children whose command is one of ``names``."""
    me, reaped = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[0] == "Z" and fields[1] == str(me) and comm in names:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)
                reaped.append(int(entry))
    return reaped


def _read_available(fd: int) -> str:
    """What a pipe holds now, without waiting (the runtime's own error message)."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, READ_CHUNK):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")[-2000:]


def _record(bundle: Path) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads((bundle / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record


def _recorded_labels(bundle: Path) -> dict[str, str]:
    labels = _record(bundle).get("labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _recorded_cgroups(bundle: Path) -> str:
    return str(_record(bundle).get("cgroupsPath") or "")
