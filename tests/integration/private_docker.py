"""A second, private Docker daemon that a test may stop and restart at will.

The machine's main daemon serves every other test running at the same time, so a
test that restarts "the" daemon mid-task gets one of its own: its own data root,
exec root (and so its own containerd, which dockerd starts and stops with itself),
unix socket and pid file under one short temporary directory, no bridge network
and no iptables changes (task containers use network ``none`` anyway). Images it
needs are copied over from the main daemon (``docker save`` | ``docker load``
through the SDK).

:meth:`PrivateDockerd.close` always leaves nothing behind: the daemon is stopped
(SIGTERM, then SIGKILL, its containerd too), every mount under the directory is
lazily unmounted, and the directory removed. Use it as a context manager.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import docker

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class PrivateDockerdError(RuntimeError):
    """The private daemon could not be started (the message carries its log)."""


class PrivateDockerd:
    def __init__(self, *, dockerd: str | None = None) -> None:
        found = dockerd or shutil.which("dockerd")
        if found is None:
            raise PrivateDockerdError("dockerd is not installed (scripts/ensure-docker.sh)")
        self._dockerd = found
        # Short: containerd's sockets live under the exec root (108-byte sun_path limit).
        self.root = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        (self.root / "daemon.json").write_text("{}\n")  # ignore /etc/docker/daemon.json
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The value for DOCKER_HOST."""
        return f"unix://{self.socket}"

    def client(self, timeout_s: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=timeout_s)

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise PrivateDockerdError("the private daemon is already running")
        argv = [
            # Its own network namespace: a dockerd started with --bridge=none deletes
            # the host's `docker0` link at start-up (moby removes the default bridge
            # interface when bridging is disabled), which would break the main daemon.
            "unshare",
            "--net",
            "--",
            self._dockerd,
            "--config-file",
            str(self.root / "daemon.json"),
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--host",
            self.host,
            "--pidfile",
            str(self.pidfile),
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            # Containers get 1 s to stop when the daemon does (then SIGKILL).
            "--shutdown-timeout=1",
            "--log-level=warn",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrivateDockerdError(
                    f"private dockerd exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.answers():
                return
            time.sleep(0.1)
        raise PrivateDockerdError(f"private dockerd did not answer in time:\n{self.log_tail()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the daemon (``sig`` first, SIGKILL after the timeout) and its containerd."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._kill_leftover_containerd()

    def answers(self) -> bool:
        """``GET /_ping`` answers 200 (a raw request: a client that fails to connect
        while being constructed cannot be closed, and would leak its socket)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                status_line = sock.recv(4096).split(b"\r\n", 1)[0]
        except OSError:
            return False
        return status_line.startswith(b"HTTP/1.") and b" 200 " in status_line + b" "

    def load_images(self, source: docker.DockerClient, *tags: str) -> None:
        """Copy images from another daemon (``docker save`` | ``docker load``)."""
        with contextlib.closing(self.client(timeout_s=300)) as client:
            for tag in tags:
                client.api.load_image(source.api.get_image(tag))  # streamed, chunk by chunk
                client.images.get(tag)  # raises if the load did not produce the tag

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop everything and remove the directory, whatever state it is in."""
        try:
            self.stop()
        finally:
            for mount in self._mounts_below():
                subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateDockerd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _kill_leftover_containerd(self) -> None:
        """A SIGKILLed dockerd leaves its containerd (and shims) running: end them."""
        for pidfile in self.root.glob("exec/containerd/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().strip())
                if _cmdline(pid).startswith("containerd"):
                    os.kill(pid, signal.SIGKILL)
        for pid in _pids_mentioning(str(self.root)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _mounts_below(self) -> list[str]:
        prefix = f"{self.root}/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return os.path.basename(raw.split(b"\0", 1)[0].decode(errors="replace"))


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text`` (containerd, its shims)."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found
