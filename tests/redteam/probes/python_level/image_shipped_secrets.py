# title: files an image may ship: shadow, root's home, SSH keys, Docker/K8s secrets, the socket
# threat: py.secrets
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"/etc/shadow": "EACCES", "/root/.bashrc": "EACCES", "/home": [], "/run/secrets": "ENOENT", "/var/run/secrets/kubernetes.io": "ENOENT", "/var/run/docker.sock": "ENOENT", "/run/docker.sock": "ENOENT", "/.dockerenv": "empty"}
import os


def read(path):
    try:
        with open(path, "rb") as handle:
            return "empty" if not handle.read() else "content"
    except IsADirectoryError:
        return sorted(os.listdir(path))
    except OSError as exc:
        return {2: "ENOENT", 13: "EACCES"}.get(exc.errno, exc.errno)


paths = [
    "/etc/shadow",
    "/root/.bashrc",
    "/home",
    "/run/secrets",
    "/var/run/secrets/kubernetes.io",
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/.dockerenv",
]
return {path: read(path) for path in paths}
