# title: raw IP sockets (v4, v6) and AF_PACKET: sniff or forge traffic
# threat: k.sockets
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"raw_icmp": "EPERM", "raw_icmp6": "EPERM", "packet": "EPERM", "ping_dgram": "ok"}
# expect ablation: success {"raw_icmp": "EPERM", "raw_icmp6": "EPERM", "packet": "EPERM", "ping_dgram": "ok"}
# layers: caps, network
# note: an ICMP ping socket is allowed (Docker sets ping_group_range); with network none there is nowhere to ping but lo
import ctypes

libc = ctypes.CDLL(None, use_errno=True)
NAMES = {
    1: "EPERM",
    2: "ENOENT",
    9: "EBADF",
    13: "EACCES",
    14: "EFAULT",
    22: "EINVAL",
    38: "ENOSYS",
    95: "EOPNOTSUPP",
    97: "EAFNOSUPPORT",
    93: "EPROTONOSUPPORT",
}


def syscall(number, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(
        ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)
    )
    return "ok" if ret >= 0 else NAMES.get(ctypes.get_errno(), ctypes.get_errno())


return {
    "raw_icmp": syscall(41, 2, 3, 1),
    "raw_icmp6": syscall(41, 10, 3, 58),
    "packet": syscall(41, 17, 3, 0x0300),
    "ping_dgram": syscall(41, 2, 2, 1),
}
