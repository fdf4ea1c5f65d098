# title: the new mount API: fsopen, open_tree, move_mount, mount_setattr
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"fsopen": "EPERM", "open_tree": "EPERM", "move_mount": "EPERM", "fspick": "EPERM"}
# expect ablation: success {"fsopen": "EPERM", "open_tree": "EPERM", "move_mount": "EPERM", "fspick": "EPERM"}
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


return {
    "fsopen": syscall(430, b"tmpfs", 0),
    "open_tree": syscall(428, -100, b"/", 1),
    "move_mount": syscall(429, -100, b"/tmp", -100, b"/mnt", 0),
    "fspick": syscall(433, -100, b"/", 0),
}
