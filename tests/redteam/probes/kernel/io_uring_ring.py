# title: io_uring_setup: a second system-call interface that seccomp cannot see into
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"io_uring_setup": "EPERM"}
# expect ablation when io_uring_disabled=0: success {"io_uring_setup": "ok"}
# expect ablation when io_uring_disabled=absent: success {"io_uring_setup": "ok"}
# expect ablation when io_uring_disabled=1: success {"io_uring_setup": "EPERM"}
# expect ablation when io_uring_disabled=2: success {"io_uring_setup": "EPERM"}
# layers when io_uring_disabled=0: none
# layers when io_uring_disabled=absent: none
# layers when io_uring_disabled=1: kernel
# layers when io_uring_disabled=2: kernel
# ours: refuses
# note: Docker 20.10's default profile allows io_uring: with our profile swapped out the ring is created where the kernel allows io_uring (sysctl kernel.io_uring_disabled 0, the reference host, or absent before 6.6); with 1 (uid 10001 is in no io_uring group) or 2 the kernel refuses it with EPERM (observed by tests/redteam/test_host_facts.py, which sets the sysctl)
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


params = ctypes.create_string_buffer(120)
return {"io_uring_setup": syscall(425, 4, params)}
