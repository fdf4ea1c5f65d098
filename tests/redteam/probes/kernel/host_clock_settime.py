# title: set the host's clocks (clock_settime, settimeofday), which every container shares
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"clock_settime": "EPERM", "settimeofday": "EPERM"}
# expect ablation: success {"clock_settime": "EPERM", "settimeofday": "EPERM"}
# layers: docker-seccomp, caps
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


timespec = (ctypes.c_long * 2)(0, 0)
return {"clock_settime": syscall(227, 0, timespec), "settimeofday": syscall(164, timespec, None)}
