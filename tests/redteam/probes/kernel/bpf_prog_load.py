# title: bpf(): load a socket filter program and create a map
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"map_create": "EPERM", "prog_load": "EPERM"}
# expect ablation: success {"map_create": "EPERM", "prog_load": "EPERM"}
# layers: docker-seccomp, caps, kernel
# note: kernel: unprivileged_bpf_disabled=2 on this host
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

insns = ctypes.create_string_buffer(
    struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
)
license = ctypes.create_string_buffer(b"GPL")
prog = struct.pack("<IIQQIIQ", 1, 2, ctypes.addressof(insns), ctypes.addressof(license), 0, 0, 0)
map_attr = struct.pack("<IIII", 2, 4, 4, 1)
return {
    "map_create": syscall(321, 0, ctypes.create_string_buffer(map_attr + bytes(64)), 80),
    "prog_load": syscall(321, 5, ctypes.create_string_buffer(prog + bytes(80)), 120),
}
