# title: the Docker API over TCP: the bridge gateway's 2375/2376 and loopback
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"172.17.0.1:2375": "ENETUNREACH", "172.17.0.1:2376": "ENETUNREACH", "127.0.0.1:2375": "ECONNREFUSED"}
# expect guards_off when runtime=gvisor: success {"127.0.0.1:2375": "ECONNREFUSED", "172.17.0.1:2375": "EHOSTUNREACH", "172.17.0.1:2376": "EHOSTUNREACH"}
# expect ablation: success {"172.17.0.1:2375": "ENETUNREACH", "172.17.0.1:2376": "ENETUNREACH", "127.0.0.1:2375": "ECONNREFUSED"}
# expect ablation when runtime=gvisor: success {"127.0.0.1:2375": "ECONNREFUSED", "172.17.0.1:2375": "EHOSTUNREACH", "172.17.0.1:2376": "EHOSTUNREACH"}
# layers: network
# ours: allows
# note: loopback is the container's own lo, where nothing listens
import socket


def attempt(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect((host, port))
        return "connected"
    except OSError as exc:
        return {101: "ENETUNREACH", 111: "ECONNREFUSED", 113: "EHOSTUNREACH"}.get(
            exc.errno, exc.errno
        )
    finally:
        sock.close()


return {
    f"{h}:{p}": attempt(h, p)
    for h, p in (("172.17.0.1", 2375), ("172.17.0.1", 2376), ("127.0.0.1", 2375))
}
