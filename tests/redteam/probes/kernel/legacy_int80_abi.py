# title: the i386 system-call ABI (int 0x80) from a 64-bit process, in a child
# threat: k.syscalls
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"int80_getpid": "killed by SIGSYS"}
# expect guards_off when runtime=gvisor: success {"int80_getpid": "returned"}
# expect ablation: success {"int80_getpid": "returned"}
# layers: none
# ours: refuses
# note: Docker's default profile lists the x86 and x32 ABIs: the call goes through; our profile kills the process (native ABI only)
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


import mmap
import os

pid = os.fork()
if pid == 0:
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    os._exit(0)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    outcome = "killed by " + ("SIGSYS" if os.WTERMSIG(status) == 31 else str(os.WTERMSIG(status)))
else:
    outcome = "returned"
return {"int80_getpid": outcome}
