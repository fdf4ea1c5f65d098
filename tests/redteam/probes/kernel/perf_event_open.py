# title: perf_event_open on the CPU cycle counter of every process, and of itself
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"system_wide": "EPERM", "self": "EPERM"}
# expect ablation: success {"system_wide": "EPERM", "self": "EPERM"}
# layers: docker-seccomp, caps, kernel
# note: perf_event_paranoid=2 on this host: counting the kernel needs CAP_PERFMON
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

attr = ctypes.create_string_buffer(struct.pack("<IIQ", 0, 128, 0) + bytes(112))
return {
    "system_wide": syscall(298, attr, -1, 0, -1, 0),
    "self": syscall(298, attr, 0, -1, -1, 0),
}
