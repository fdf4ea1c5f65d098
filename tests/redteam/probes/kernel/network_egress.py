# title: egress: TCP and UDP to the internet over IPv4 and IPv6, DNS, the cloud metadata address
# threat: k.sockets
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"interfaces": ["lo"], "tcp4": "ENETUNREACH", "udp4": "ENETUNREACH", "tcp6": "EADDRNOTAVAIL", "metadata": "ENETUNREACH", "dns": "gaierror"}
# expect guards_off when runtime=gvisor: success {"dns": "gaierror", "interfaces": ["lo"], "metadata": "EHOSTUNREACH", "tcp4": "EHOSTUNREACH", "tcp6": "EHOSTUNREACH", "udp4": "EHOSTUNREACH"}
# expect ablation: success {"interfaces": ["lo"], "tcp4": "ENETUNREACH", "udp4": "ENETUNREACH", "tcp6": "EADDRNOTAVAIL", "metadata": "ENETUNREACH", "dns": "gaierror"}
# expect ablation when runtime=gvisor: success {"dns": "gaierror", "interfaces": ["lo"], "metadata": "EHOSTUNREACH", "tcp4": "EHOSTUNREACH", "tcp6": "EHOSTUNREACH", "udp4": "EHOSTUNREACH"}
# layers: network
# ours: allows
import socket


def attempt(family, kind, address):
    sock = socket.socket(family, kind)
    sock.settimeout(3)
    try:
        if kind == socket.SOCK_DGRAM:
            sock.sendto(b"x", address)
            return "sent"
        sock.connect(address)
        return "connected"
    except OSError as exc:
        return {101: "ENETUNREACH", 113: "EHOSTUNREACH", 99: "EADDRNOTAVAIL"}.get(
            exc.errno, exc.errno
        )
    finally:
        sock.close()


try:
    socket.getaddrinfo("example.com", 443)
    dns = "resolved"
except socket.gaierror:
    dns = "gaierror"
return {
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "tcp4": attempt(socket.AF_INET, socket.SOCK_STREAM, ("1.1.1.1", 443)),
    "udp4": attempt(socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53)),
    "tcp6": attempt(socket.AF_INET6, socket.SOCK_STREAM, ("2606:4700:4700::1111", 443)),
    "metadata": attempt(socket.AF_INET, socket.SOCK_STREAM, ("169.254.169.254", 80)),
    "dns": dns,
}
