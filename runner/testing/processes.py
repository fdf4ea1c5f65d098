"""runner.testing's service processes: ``sandbox-runner serve`` / ``up`` / ``broker`` as a
child process of this Python, configured like an operator would (environment variables
only).

A broker (``up``, ``broker``) gets a task store of its own unless ``env`` names one
(``SANDBOX_BROKER_STORE``): the default SQLite store, in a temporary directory made for
that process and removed when it stops. Never the default file in the state directory:
two tests would share it (one test's leftover tasks recovered by the next, and a
second broker on the file refused while the first runs), and moving the whole state
directory (``SANDBOX_STATE_DIR``) would move the OCI backend's unpacked task image too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runner.testing.client import SandboxServiceError
from runner.testing.session import STARTUP_TIMEOUT_S


class _ServiceProcess:
    """A ``sandbox-runner`` command as a child process of this Python, configured like an
    operator would: environment variables only; the caller's own ``N8N_*``/``SANDBOX_*``
    variables are not inherited. Its output is kept in :attr:`lines` (the last
    ``keep_lines`` of them, when given)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        keep_lines: int | None = None,
        store_dir: Path | None = None,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "SANDBOX_"))}
        full_env.update(env)
        self.store_dir = store_dir  # the broker's own store, removed by stop()
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._line_added = threading.Condition()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runner", *argv],
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except BaseException:
            if store_dir is not None:
                shutil.rmtree(store_dir, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._line_added:
                self.lines.append(line.rstrip("\n"))
                self._line_added.notify_all()
        with self._line_added:
            self._line_added.notify_all()

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """The first output line starting with ``prefix``; SandboxServiceError if the
        process exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        with self._line_added:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise SandboxServiceError(
                        f"no line starting with {prefix!r} within {timeout_s:.0f}s:\n"
                        + self.output[-4000:]
                    )
                self._line_added.wait(min(remaining, 1.0))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_mib(self) -> float:
        """The process's resident memory now, in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
        return round(kib / 1024, 1)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM (the graceful drain), SIGKILL after ``timeout_s``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        return self.process.returncode

    async def aclose(self, timeout_s: float = 20) -> int:
        """:meth:`stop` without blocking the event loop an in-process broker runs on."""
        return await asyncio.to_thread(self.stop, timeout_s)


STORE_VARIABLE = "SANDBOX_BROKER_STORE"


def _own_store(env: dict[str, str] | None) -> tuple[dict[str, str], Path | None]:
    """``env`` with a store for one broker process: the caller's, or the default SQLite
    store in a new temporary directory (returned: :meth:`_ServiceProcess.stop` removes
    it)."""
    env = dict(env or {})
    if STORE_VARIABLE in env:
        return env, None
    store_dir = Path(tempfile.mkdtemp(prefix="sandbox-broker-"))
    env[STORE_VARIABLE] = f"sqlite:///{store_dir / 'broker-tasks.sqlite3'}"
    return env, store_dir


class ServeProcess(_ServiceProcess):
    """``sandbox-runner serve`` as a child process, for a broker you run yourself (e.g.
    :func:`runner.broker_server.server.running_broker` in your test's event loop)."""

    def __init__(
        self,
        broker_url: str,
        auth_token: str,
        env: dict[str, str] | None = None,
        *,
        keep_lines: int | None = None,
    ) -> None:
        super().__init__(
            ["serve"],
            {
                **(env or {}),
                "N8N_RUNNERS_TASK_BROKER_URI": broker_url,
                "N8N_RUNNERS_AUTH_TOKEN": auth_token,
            },
            keep_lines=keep_lines,
        )


UP_LINE = "sandbox-runner is up: POST "


class UpProcess(_ServiceProcess):
    """``sandbox-runner up`` (the embedded broker and one runner in one process) as a
    child process on a free loopback port; :attr:`url` is its API once it is up.

    ``env`` configures it (``SANDBOX_API_KEYS``, ``SANDBOX_STDLIB_ALLOW``, ...). Its
    broker's task store is its own (:attr:`store_dir`, removed when it stops) unless
    ``env`` names one (``SANDBOX_BROKER_STORE``).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        keep_lines: int | None = None,
    ) -> None:
        env, store_dir = _own_store(env)
        super().__init__(
            ["up", "--host", "127.0.0.1", "--port", "0"],
            env,
            keep_lines=keep_lines,
            store_dir=store_dir,
        )
        try:
            line = self.wait_for_line(UP_LINE, startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix(UP_LINE).split()[0].removesuffix("/v1/tasks")


BROKER_LINE = "broker listening on "


class BrokerProcess(_ServiceProcess):
    """``sandbox-runner broker`` (the embedded broker alone) as a child process on
    ``port`` of loopback (0: a free one); :attr:`url` is its address once it listens.

    ``env`` configures it (``N8N_RUNNERS_AUTH_TOKEN`` for its runners,
    ``SANDBOX_BROKER_STORE``, ``SANDBOX_API_KEYS``, ...). Give a fixed ``port`` when
    runners must find it again after a restart, and a ``SANDBOX_BROKER_STORE`` when
    the next broker must find its tasks: without one, its store is its own
    (:attr:`store_dir`, removed when it stops).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        port: int = 0,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        keep_lines: int | None = None,
    ) -> None:
        env, store_dir = _own_store(env)
        super().__init__(
            ["broker", "--host", "127.0.0.1", "--port", str(port)],
            env,
            keep_lines=keep_lines,
            store_dir=store_dir,
        )
        try:
            line = self.wait_for_line(BROKER_LINE, startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix(BROKER_LINE).split()[0]

    def kill(self) -> int:
        """SIGKILL: no drain, nothing flushed, as a crash or the OOM killer; the exit code."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        return self.stop()


class RedisServer:
    """A ``redis-server`` of your own for a test or a benchmark (Debian's
    ``redis-server`` package; the project's ``make test`` installs it): on a free
    port of 127.0.0.1, no persistence, its files in ``directory``; :attr:`url` for
    ``SANDBOX_BROKER_STORE``. A context manager. Missing, it raises AssertionError
    naming the package (a test fails, never skips)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError(
                "redis-server is not installed: `make test` installs it (Debian's "
                "redis-server package), or `apt-get install redis-server`"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.directory),
            "daemonize": "no",
            "logfile": str(self.directory / "redis.log"),
        }
        arguments = [part for name, value in options.items() for part in (f"--{name}", value)]
        self._process = subprocess.Popen(
            [binary, *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"redis-server did not answer on port {self.port}:\n{log}")

    def flush(self) -> None:
        """Empty every database (a test's keys gone before the next test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(16).startswith(b"+OK")

    def __exit__(self, *_: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
