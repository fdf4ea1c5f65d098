# title: AF_ALG: the kernel crypto API as a socket (a frequent source of kernel bugs)
# threat: k.sockets
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"socket": "EPERM"}
# expect ablation when af_alg=no: success {"socket": "EAFNOSUPPORT"}
# expect ablation when af_alg=yes: success {"socket": "ok"}
# layers when af_alg=no: kernel
# layers when af_alg=yes: none
# ours: refuses
# note: keyed on whether the test process can create an AF_ALG socket: the reference host's kernel is built without AF_ALG (EAFNOSUPPORT); on a kernel with it Docker's default profile allows socket() for every family, so the socket is created (derived, not yet observed)
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


return {"socket": syscall(41, 38, 5, 0)}
