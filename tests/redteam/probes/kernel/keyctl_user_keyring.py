# title: kernel keyrings: add_key to the uid's keyring, keyctl to read it, request_key
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"add_key": "EPERM", "keyctl_get_keyring": "EPERM", "request_key": "EPERM"}
# expect ablation: success {"add_key": "EPERM", "keyctl_get_keyring": "EPERM", "request_key": "EPERM"}
# layers: docker-seccomp
# ours: refuses
# note: keyrings are per uid, not per container: every task runs as 10001, so with seccomp gone this is a cross-task channel
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
    "add_key": syscall(248, b"user", b"redteam", b"secret", 6, -4),
    "keyctl_get_keyring": syscall(250, 0, -4, 0),
    "request_key": syscall(249, b"user", b"redteam-listener", None, 0),
}
