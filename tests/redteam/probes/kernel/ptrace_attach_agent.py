# title: ptrace(PTRACE_ATTACH) and PTRACE_SEIZE on the agent, the task's parent
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"attach": "EPERM", "seize": "EPERM", "traceme": "EPERM"}
# expect ablation: success {"attach": "EPERM", "seize": "EPERM", "traceme": "ok"}
# expect ablation when runtime=gvisor: success {"attach": "EPERM", "seize": "EPERM", "traceme": "EPERM"}
# layers: caps, agent
# note: Docker's default allows ptrace; the kernel refuses it because the agent is undumpable and the task has no CAP_SYS_PTRACE
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
pid = os.fork()
if pid == 0:
    os._exit(0 if syscall(101, 0, 0, 0, 0) == "ok" else 1)
_, status = os.waitpid(pid, 0)
return {
    "attach": syscall(101, 16, agent, 0, 0),
    "seize": syscall(101, 0x4206, agent, 0, 0),
    "traceme": "ok" if os.waitstatus_to_exitcode(status) == 0 else "EPERM",
}
