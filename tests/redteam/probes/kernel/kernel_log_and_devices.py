# title: the kernel log (syslog(2), /dev/kmsg) and device nodes (mknod a block device)
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"syslog_read_all": "EPERM", "dev_kmsg": "ENOENT", "mknod_block": "EPERM", "dev": ["fd", "full", "mqueue", "null", "ptmx", "pts", "random", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]}
# expect guards_off when runtime=gvisor: success {"dev": ["fd", "full", "fuse", "net", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"], "dev_kmsg": "ENOENT", "mknod_block": "ok", "syslog_read_all": "EPERM"}
# expect ablation: success {"syslog_read_all": "EPERM", "dev_kmsg": "ENOENT", "mknod_block": "EPERM", "dev": ["fd", "full", "mqueue", "null", "ptmx", "pts", "random", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]}
# expect ablation when runtime=gvisor: success {"dev": ["fd", "full", "fuse", "net", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"], "dev_kmsg": "ENOENT", "mknod_block": "ok", "syslog_read_all": "EPERM"}
# layers: docker-seccomp, caps, kernel
# note: syslog(2) needs CAP_SYSLOG (dmesg_restrict=1 here) and Docker's profile allows it only with that capability; /dev/kmsg is not in the container's /dev; mknod needs CAP_MKNOD, and /tmp is nodev anyway
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

buffer = ctypes.create_string_buffer(4096)
try:
    os.open("/dev/kmsg", os.O_RDONLY)
    kmsg = "opened"
except OSError as exc:
    kmsg = NAMES.get(exc.errno, exc.errno)
try:
    os.mknod("/tmp/sda", 0o60600, os.makedev(8, 0))
    mknod = "ok"
except OSError as exc:
    mknod = NAMES.get(exc.errno, exc.errno)
return {
    "syslog_read_all": syscall(103, 3, buffer, 4096),
    "dev_kmsg": kmsg,
    "mknod_block": mknod,
    "dev": sorted(os.listdir("/dev")),
}
