# title: clone(2) with CLONE_NEWUSER and CLONE_NEWNS; clone3 (answered ENOSYS)
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"clone_newuser": "EPERM", "clone_newns": "EPERM", "clone3": "ENOSYS"}
# expect ablation: success {"clone_newuser": "EPERM", "clone_newns": "EPERM", "clone3": "ENOSYS"}
# layers when userns=yes: docker-seccomp
# layers when userns=no: docker-seccomp, kernel
# ours: refuses
# note: CLONE_NEWUSER is refused only by a seccomp profile (Docker's masks the namespace flags of clone); CLONE_NEWNS would also need CAP_SYS_ADMIN
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


def clone(flags):
    ctypes.set_errno(0)
    ret = libc.syscall(
        ctypes.c_long(56), ctypes.c_long(flags | 17), None, None, None, ctypes.c_long(0)
    )
    if ret == 0:
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
        return "ok"
    return NAMES.get(ctypes.get_errno(), ctypes.get_errno())


return {
    "clone_newuser": clone(0x10000000),
    "clone_newns": clone(0x00020000),
    "clone3": syscall(435, None, 0),
}
