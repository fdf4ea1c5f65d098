# title: adjtimex(modes=0): read the host's NTP and clock discipline state
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"adjtimex_read": "EPERM"}
# expect ablation: success {"adjtimex_read": "ok"}
# expect ablation when runtime=gvisor: success {"adjtimex_read": "EPERM"}
# layers: none
# ours: refuses
# note: a read-only leak of host state that Docker's profile allows; writing it would need CAP_SYS_TIME
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


timex = ctypes.create_string_buffer(256)
return {"adjtimex_read": syscall(159, timex)}
