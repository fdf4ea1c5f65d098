# title: SysV shared memory and semaphores: attach the listener's segment by its key
# threat: k.cross-task
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"shmget_listener_key": "EPERM", "semget": "EPERM", "msgget": "EPERM"}
# expect ablation: success {"shmget_listener_key": "ENOENT", "semget": "ok", "msgget": "ok"}
# layers: ipcns
# ours: refuses
# note: with Docker's profile SysV IPC works, but only inside the task's own IPC namespace: the listener's segment is not there
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
    "shmget_listener_key": syscall(29, 0x52544D, 4096, 0),
    "semget": syscall(64, 0, 1, 0o1600),
    "msgget": syscall(68, 0, 0o1600),
}
