"""A fault-injecting proxy in front of the real Docker API socket.

It forwards every request to the daemon unchanged, except the next N requests
that match a rule, which get an HTTP error straight from the proxy (as a failing
or overloaded daemon would answer). Tests point a docker client at it to prove
that set-up failures are retried and user failures are not, against the real
engine, through the real docker SDK exception mapping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    method: str
    path_pattern: str
    remaining: int
    status: int = 500
    reason: str = "Internal Server Error"
    message: str = "injected fault"

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and method == self.method
            and re.search(self.path_pattern, path) is not None
        )


@dataclass
class DockerFaultProxy:
    upstream: str = "/var/run/docker.sock"
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="docker-proxy-")
        self.path = os.path.join(self._dir.name, "docker.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(64)
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"unix://{self.path}"

    def inject(self, method: str, path_pattern: str, times: int = 1, status: int = 500) -> Fault:
        fault = Fault(method, path_pattern, times, status)
        with self._lock:
            self.faults.append(fault)
        return fault

    def count(self, method: str, path_pattern: str) -> int:
        """Requests seen (forwarded or faulted) that match."""
        return sum(1 for m, p, _ in self.seen if m == method and re.search(path_pattern, p))

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()
        self._dir.cleanup()

    # -- internals ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:
            client.close()
            return
        # Responses flow back blindly; that thread owns closing both sockets at the end.
        threading.Thread(target=_pipe, args=(upstream, client, True), daemon=True).start()
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in header_lines)
                }
                length = int(headers.get("content-length", "0") or 0)
                while len(buffer) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                fault = self._take_fault(method, path)
                self.seen.append((method, path, fault.status if fault else None))
                if fault is not None:
                    payload = json.dumps({"message": fault.message}).encode()
                    client.sendall(
                        f"HTTP/1.1 {fault.status} {fault.reason}\r\n"
                        "Content-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n".encode()
                        + payload
                    )
                    continue
                upstream.sendall(head + b"\r\n\r\n" + body)
                if "upgrade" in headers.get("connection", "").lower():
                    if buffer:
                        upstream.sendall(buffer)
                    _pipe(client, upstream)  # hijacked stream: raw bytes from now on
                    return
        except OSError:
            return
        finally:
            # The client is done sending: let the daemon finish and close its side,
            # which ends the response thread and closes both sockets.
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None


def _pipe(source: socket.socket, target: socket.socket, close_both: bool = False) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        if close_both:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.close()
