# title: mount a tmpfs, a proc and a cgroup filesystem with the classic mount(2)
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"tmpfs": "EPERM", "proc": "EPERM", "cgroup": "EPERM", "remount_root_rw": "EPERM"}
# expect ablation: success {"tmpfs": "EPERM", "proc": "EPERM", "cgroup": "EPERM", "remount_root_rw": "EPERM"}
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


import os

os.makedirs("/tmp/m", exist_ok=True)
return {
    "tmpfs": syscall(165, b"none", b"/tmp/m", b"tmpfs", 0, None),
    "proc": syscall(165, b"proc", b"/tmp/m", b"proc", 0, None),
    "cgroup": syscall(165, b"cgroup", b"/tmp/m", b"cgroup", 0, b"memory"),
    "remount_root_rw": syscall(165, None, b"/", None, 32, None),
}
