# title: the Docker daemon's unix sockets (docker.sock, containerd.sock) inside the container
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"/var/run/docker.sock": "ENOENT", "/run/docker.sock": "ENOENT", "/run/containerd/containerd.sock": "ENOENT", "/var/run/docker": "ENOENT"}
# expect ablation: success {"/var/run/docker.sock": "ENOENT", "/run/docker.sock": "ENOENT", "/run/containerd/containerd.sock": "ENOENT", "/var/run/docker": "ENOENT"}
# layers: config
# ours: allows
# note: one layer by nature: the socket is never mounted (the runner creates no mounts but /tmp, and the policy linter rejects host mounts)
import socket


def attempt(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return "connected"
    except OSError as exc:
        return {2: "ENOENT", 13: "EACCES", 111: "ECONNREFUSED", 20: "ENOTDIR"}.get(
            exc.errno, exc.errno
        )
    finally:
        sock.close()


paths = [
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/docker",
]
return {path: attempt(path) for path in paths}
