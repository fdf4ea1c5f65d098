# title: process_vm_readv / process_vm_writev on the agent's memory
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"readv": "EPERM", "writev": "EPERM", "pidfd_getfd": "EPERM"}
# expect guards_off when runtime=gvisor: user_error@run "[Errno 38] Function not implemented"
# expect ablation: success {"readv": "EPERM", "writev": "EPERM", "pidfd_getfd": "EPERM"}
# expect ablation when runtime=gvisor: user_error@run "[Errno 38] Function not implemented"
# layers: docker-seccomp, caps, agent
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

agent = os.getppid()
buffer = ctypes.create_string_buffer(64)
local = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 64)
remote = (ctypes.c_void_p * 2)(0x400000, 64)
pidfd = os.pidfd_open(agent)
return {
    "readv": syscall(310, agent, local, 1, remote, 1, 0),
    "writev": syscall(311, agent, local, 1, remote, 1, 0),
    "pidfd_getfd": syscall(438, pidfd, 0, 0),
}
