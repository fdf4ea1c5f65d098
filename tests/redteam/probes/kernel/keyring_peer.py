# title: find the listener's key in the shared per-uid keyring (keyctl search and describe)
# threat: k.cross-task
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"search": "EPERM", "describe_user_keyring": "EPERM"}
# expect ablation: success {"search": "EPERM", "describe_user_keyring": "EPERM"}
# layers: docker-seccomp
# ours: refuses
# note: the user keyring of uid 10001 is shared by every task container on the host: only seccomp keeps it closed
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


buffer = ctypes.create_string_buffer(256)
return {
    "search": syscall(250, 10, -4, b"user", b"redteam-listener", 0),
    "describe_user_keyring": syscall(250, 6, -4, buffer, 256),
}
