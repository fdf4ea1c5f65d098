# title: importlib.import_module('socket'), then egress to the internet and the Docker API
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'importlib' is disallowed"
# expect guards_off: success {"internet": "ENETUNREACH", "docker_tcp": "ENETUNREACH", "dns": "gaierror"}
# expect guards_off when runtime=gvisor: success {"dns": "gaierror", "docker_tcp": "EHOSTUNREACH", "internet": "EHOSTUNREACH"}
import importlib

socket = importlib.import_module("socket")


def connect(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect((host, port))
        return "connected"
    except OSError as exc:
        return {101: "ENETUNREACH", 113: "EHOSTUNREACH", 111: "ECONNREFUSED"}.get(
            exc.errno, exc.errno
        )
    finally:
        sock.close()


try:
    socket.getaddrinfo("example.com", 443)
    dns = "resolved"
except socket.gaierror:
    dns = "gaierror"
return {"internet": connect("1.1.1.1", 443), "docker_tcp": connect("172.17.0.1", 2375), "dns": dns}
