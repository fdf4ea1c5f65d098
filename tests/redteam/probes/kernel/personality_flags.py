# title: personality(READ_IMPLIES_EXEC) and ADDR_NO_RANDOMIZE in a child
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"READ_IMPLIES_EXEC": "EPERM", "ADDR_NO_RANDOMIZE": "EPERM"}
# expect ablation: success {"READ_IMPLIES_EXEC": "EPERM", "ADDR_NO_RANDOMIZE": "EPERM"}
# layers: docker-seccomp
# ours: refuses
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


def in_child(persona):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if syscall(135, persona) == "ok" else 1)
    _, status = os.waitpid(pid, 0)
    return "ok" if os.waitstatus_to_exitcode(status) == 0 else "EPERM"


return {"READ_IMPLIES_EXEC": in_child(0x0400000), "ADDR_NO_RANDOMIZE": in_child(0x0040000)}
