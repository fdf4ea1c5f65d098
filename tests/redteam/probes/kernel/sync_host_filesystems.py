# title: sync(2) and syncfs: flush every filesystem of the host (an I/O storm for all tenants)
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"sync": "EPERM", "syncfs": "EPERM"}
# expect ablation: success {"sync": "ok", "syncfs": "ok"}
# layers: none
# ours: refuses
# note: Docker's profile allows both; they need no capability
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

fd = os.open("/tmp", os.O_RDONLY)
return {"sync": syscall(162), "syncfs": syscall(306, fd)}
