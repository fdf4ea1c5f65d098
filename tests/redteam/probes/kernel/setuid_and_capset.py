# title: become root: setuid(0), setresuid(0,0,0), capset all, prctl ambient raise
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"setuid": "EPERM", "setresuid": "EPERM", "capset": "EPERM", "ambient_raise": "EPERM"}
# expect ablation: success {"setuid": "EPERM", "setresuid": "EPERM", "capset": "EPERM", "ambient_raise": "EPERM"}
# expect ablation when runtime=gvisor: success {"ambient_raise": "EINVAL", "capset": "EPERM", "setresuid": "EPERM", "setuid": "EPERM"}
# layers: caps, uid
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


import struct

header = ctypes.create_string_buffer(struct.pack("<Ii", 0x20080522, 0))
data = ctypes.create_string_buffer(struct.pack("<6I", *([0xFFFFFFFF] * 6)))
return {
    "setuid": syscall(105, 0),
    "setresuid": syscall(117, 0, 0, 0),
    "capset": syscall(126, header, data),
    "ambient_raise": syscall(157, 47, 2, 21, 0, 0),
}
