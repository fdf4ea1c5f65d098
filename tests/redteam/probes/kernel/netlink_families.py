# title: netlink beyond routing: audit, netfilter, xfrm, kobject uevents
# threat: k.sockets
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"audit": "EPERM", "netfilter": "EPERM", "xfrm": "EPERM", "kobject_uevent": "EPERM"}
# expect ablation: success {"audit": "ok", "netfilter": "ok", "xfrm": "ok", "kobject_uevent": "ok"}
# expect ablation when runtime=gvisor: success {"audit": "EPROTONOSUPPORT", "kobject_uevent": "ok", "netfilter": "EPROTONOSUPPORT", "xfrm": "EPROTONOSUPPORT"}
# layers: none
# ours: refuses
# note: Docker's default lets any netlink socket be created; what it can do afterwards is up to capabilities and the network namespace
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
    "audit": syscall(41, 16, 3, 9),
    "netfilter": syscall(41, 16, 3, 12),
    "xfrm": syscall(41, 16, 3, 6),
    "kobject_uevent": syscall(41, 16, 2, 15),
}
