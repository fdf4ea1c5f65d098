# title: unshare a user namespace (then mount, net, pid) in a throwaway child
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"user": "EPERM", "user+mount": "EPERM", "net": "EPERM", "setns": "EPERM"}
# expect ablation: success {"user": "EPERM", "user+mount": "EPERM", "net": "EPERM", "setns": "EPERM"}
# layers when userns=yes: docker-seccomp
# layers when userns=no: docker-seccomp, kernel
# ours: refuses
# note: without any seccomp profile unshare(CLONE_NEWUSER) succeeds here (policies/README.md 1.6): only a seccomp profile, ours or Docker's, refuses it
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


import os


def in_child(flags):
    pid = os.fork()
    if pid == 0:
        result = syscall(272, flags)
        os._exit(0 if result == "ok" else (1 if result == "EPERM" else 2))
    _, status = os.waitpid(pid, 0)
    return {0: "ok", 1: "EPERM"}.get(os.waitstatus_to_exitcode(status), "other")


fd = os.open("/proc/1/ns/net", os.O_RDONLY) if os.access("/proc/1/ns/net", os.R_OK) else -1
return {
    "user": in_child(0x10000000),
    "user+mount": in_child(0x10000000 | 0x00020000),
    "net": in_child(0x40000000),
    "setns": syscall(308, fd, 0),
}
