# title: exhaust the inotify instances of uid 10001, a per-uid quota shared by every task on the host
# threat: k.cross-task
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"first": "EPERM"}
# expect ablation: success {"first": "ok", "stopped_by": "EMFILE", "took_the_whole_host_quota": true}
# expect ablation when runtime=gvisor: user_error@run "[Errno 2] No such file or directory: '/proc/sys/fs/inotify/max_user_instances'"
# layers: none
# ours: refuses
# note: Docker's profile allows inotify; its instances are counted per uid host-wide, so one task could starve every other task container of the same uid (freed when the task ends)
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

fds = []
first = syscall(294, 0)
if first != "ok":
    return {"first": first}
stopped = None
try:
    while len(fds) < 100000:
        ctypes.set_errno(0)
        fd = libc.syscall(ctypes.c_long(294), ctypes.c_long(0))
        if fd < 0:
            stopped = {24: "EMFILE", 23: "ENFILE"}.get(ctypes.get_errno(), ctypes.get_errno())
            break
        fds.append(fd)
finally:
    for fd in fds:
        os.close(fd)
with open("/proc/sys/fs/inotify/max_user_instances") as handle:
    quota = int(handle.read())
# the probe's own first instance counts too (it is closed with the process)
return {"first": "ok", "stopped_by": stopped, "took_the_whole_host_quota": len(fds) + 1 == quota}
