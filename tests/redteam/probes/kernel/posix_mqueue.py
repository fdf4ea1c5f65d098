# title: POSIX message queues (mq_open) as a channel between tasks
# threat: k.cross-task
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"mq_open": "EPERM"}
# expect ablation: success {"mq_open": "ok"}
# layers: ipcns
# ours: refuses
# note: under Docker's profile the queue is created, in the task's own IPC namespace
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


return {"mq_open": syscall(240, b"redteam", 0o100 | 2, 0o600, None)}
