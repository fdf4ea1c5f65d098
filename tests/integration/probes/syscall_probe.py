"""Kernel-policy probe: what a task container refuses, and what it must still allow.

Run it inside a task container (standalone, standard library and ctypes only)::

    python3 syscall_probe.py        # prints ONE JSON object, keys sorted

or call ``run_probes()`` to get the same mapping as a dict. Every entry is
``probe name -> {"errno": int | null, "ok": bool}``:

- ``works.*``: something pure-Python computation, threads, the agent or tini needs.
  ``ok`` is true when it worked; ``errno`` is the error it failed with (``null``
  when it worked, or when it failed without an errno).
- everything else is a refusal probe (``syscall.*``, ``clone.*``, ``personality.*``,
  ``prctl.*``, ``ioctl.*``, ``prlimit64.*``, ``socket.*``, ``socketpair.*``,
  ``abi.*``). ``ok`` is true when the call was refused with the errno
  ``policies/seccomp/task.json`` answers (EPERM; ENOSYS for ``clone3``). ``errno``
  is what the call returned; ``null`` means it succeeded, except for ``abi.*``
  where ``null`` with ``ok`` true means the probing child was killed with SIGSYS
  (seccomp's bad-architecture action).

Through the real pipeline (the code runs as a task, where ``print`` is captured and
stdout is not the result channel), run this file's source with a ``__name__`` other
than ``"__main__"`` and return ``run_probes()`` as the task's result.

How an EPERM is made to mean "seccomp refused it": every refusal probe passes
arguments the kernel itself would reject (a NULL pointer -> EFAULT, fd -1 -> EBADF,
an invalid flag or command -> EINVAL, a pid that cannot exist -> ESRCH), so that
without seccomp the answer is *not* EPERM and, in the unlikely case the call is
allowed, it does nothing. A seccomp filter runs before the system call and never
looks at those arguments beyond its own argument filters, so it answers EPERM.
Some calls check a capability before their arguments; with all capabilities
dropped they answer EPERM even with seccomp off, so for them EPERM cannot tell the
two layers apart (marked ``CAP FIRST`` below; policies/README.md has the table run
with our profile, Docker's default profile and no seccomp at all).

Calls that change the calling process if they succeed (``unshare``, a namespace
``clone``, ``personality``, ``prctl``, 32-bit ``int 0x80``) run in a forked child
that exits at once; every child is reaped with a deadline, so the probe never
hangs. The whole run takes well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import mmap
import os
import platform
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

EPERM = errno.EPERM
ENOSYS = errno.ENOSYS
CHILD_DEADLINE_S = 5.0

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
_LIBC.prctl.restype = ctypes.c_int

# System call numbers: (x86_64, aarch64). aarch64 uses the asm-generic table.
_NR: dict[str, tuple[int, int]] = {
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "userfaultfd": (323, 282),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "mount": (165, 40),
    "umount2": (166, 39),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "move_mount": (429, 429),
    "open_tree": (428, 428),
    "mount_setattr": (442, 442),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "clone": (56, 220),
    "clone3": (435, 435),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "clock_settime": (227, 112),
    "settimeofday": (164, 170),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "personality": (135, 92),
    "socket": (41, 198),
    "socketpair": (53, 199),
    "memfd_create": (319, 279),
    "execveat": (322, 281),
    "splice": (275, 76),
    "vmsplice": (278, 75),
    "tee": (276, 77),
    "inotify_init1": (294, 26),
    "io_setup": (206, 0),
    "msgctl": (71, 187),
    "shmctl": (31, 195),
    "mq_open": (240, 180),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "syslog": (103, 116),
    "getpid": (39, 172),
    "ioctl": (16, 29),
    "prlimit64": (302, 261),
    "modify_ldt": (154, -1),  # x86 only
}
_IS_X86_64 = platform.machine() in ("x86_64", "amd64")
_ARCH_INDEX = 0 if _IS_X86_64 else 1

# Values the kernel rejects by itself (see the module docstring).
NO_SUCH_PID = 0x3FFFFFFF  # above PID_MAX_LIMIT (4194304)
BAD_FLAGS = 0x7FFFFFF0  # unknown flag bits for every *flags argument probed here
CLONE_NEWUSER = 0x10000000
SIGCHLD = int(signal.SIGCHLD)
SOCK_BAD_FLAG = 0x40000000  # not SOCK_CLOEXEC/SOCK_NONBLOCK: socket() -> EINVAL
UFFD_USER_MODE_ONLY = 1
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_PTRACER = 0x59616D61
PER_QUERY = 0xFFFFFFFF
ADDR_NO_RANDOMIZE = 0x0040000
READ_IMPLIES_EXEC = 0x0400000
X32_SYSCALL_BIT = 0x40000000

Result = dict[str, Any]


def _result(err: int | None, ok: bool) -> Result:
    return {"errno": err, "ok": ok}


def _syscall(name: str, *args: int) -> tuple[int, int | None]:
    """Raw system call by name: (return value, errno or None)."""
    number = _NR[name][_ARCH_INDEX]
    ctypes.set_errno(0)
    ret = _LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    return ret, (ctypes.get_errno() if ret == -1 else None)


def _syscall_prctl(option: int, arg: int) -> int | None:
    """prctl(option, arg, 0, 0, 0) through libc: errno or None."""
    ctypes.set_errno(0)
    zero = ctypes.c_ulong(0)
    ret = _LIBC.prctl(option, ctypes.c_ulong(arg), zero, zero, zero)
    return ctypes.get_errno() if ret == -1 else None


def _in_child(body: Callable[[], int | None]) -> tuple[int | None, int | None]:
    """Run ``body`` (returns an errno or None) in a forked child.

    Returns (errno, fatal signal): the signal is set when the child was killed.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, whatever happens
        code = 0
        try:
            os.close(read_fd)
            err = body()
            os.write(write_fd, struct.pack("=i", -1 if err is None else err))
        except BaseException:  # nothing may escape a probe child but its exit code
            code = 1
        os._exit(code)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], CHILD_DEADLINE_S)
        data = os.read(read_fd, 4) if ready else b""
    finally:
        os.close(read_fd)
    if not data:  # killed, or stuck: make sure it is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and len(data) != 4:
        return None, os.WTERMSIG(status)
    if len(data) != 4:
        return None, None
    (value,) = struct.unpack("=i", data)
    return (None if value == -1 else value), None


# -- refusal probes -------------------------------------------------------------------

# name -> (system call, arguments the kernel would reject by itself).
# "CAP FIRST": the kernel checks a capability before these arguments.
_REFUSED: dict[str, tuple[str, tuple[int, ...]]] = {
    # io_uring: a second syscall surface that bypasses per-syscall filtering.
    "syscall.io_uring_setup": ("io_uring_setup", (1, 0)),  # params NULL -> EFAULT
    "syscall.io_uring_enter": ("io_uring_enter", (-1, 0, 0, 0, 0, 0)),  # EBADF
    "syscall.io_uring_register": ("io_uring_register", (-1, 9999, 0, 0)),  # EINVAL
    # kernel keyrings: not namespaced, shared by every container of a uid.
    "syscall.keyctl": ("keyctl", (9999, 0, 0, 0, 0)),  # unknown op -> EOPNOTSUPP
    "syscall.add_key": ("add_key", (0, 0, 0, 0, 0)),  # type NULL -> EFAULT
    "syscall.request_key": ("request_key", (0, 0, 0, 0)),  # type NULL -> EFAULT
    # userfaultfd: stalls kernel page faults at will (race widening for exploits).
    "syscall.userfaultfd": ("userfaultfd", (UFFD_USER_MODE_ONLY | 0x2,)),  # EINVAL
    "syscall.bpf": ("bpf", (9999, 0, 0)),  # unknown command -> EINVAL
    "syscall.perf_event_open": ("perf_event_open", (0, 0, -1, -1, BAD_FLAGS)),  # EINVAL
    # reading or writing another process (the agent) directly.
    "syscall.ptrace": ("ptrace", (2, NO_SUCH_PID, 0, 0)),  # PEEKDATA -> ESRCH
    "syscall.process_vm_readv": ("process_vm_readv", (NO_SUCH_PID, 0, 0, 0, 0, 1)),  # EINVAL
    "syscall.process_vm_writev": ("process_vm_writev", (NO_SUCH_PID, 0, 0, 0, 0, 1)),
    "syscall.kcmp": ("kcmp", (NO_SUCH_PID, NO_SUCH_PID, 0, 0, 0)),  # ESRCH
    # mounts, old and new API, and changing the root.
    "syscall.mount": ("mount", (0, 0, 0, 0, 0)),  # target NULL -> EFAULT
    "syscall.umount2": ("umount2", (0, BAD_FLAGS)),  # EINVAL
    "syscall.fsopen": ("fsopen", (0, BAD_FLAGS)),  # CAP FIRST
    "syscall.fsconfig": ("fsconfig", (-1, 9999, 0, 0, 0)),  # EBADF/EINVAL
    "syscall.fsmount": ("fsmount", (-1, BAD_FLAGS, 0)),  # CAP FIRST
    "syscall.fspick": ("fspick", (-1, 0, BAD_FLAGS)),  # CAP FIRST
    "syscall.move_mount": ("move_mount", (-1, 0, -1, 0, BAD_FLAGS)),  # CAP FIRST
    "syscall.open_tree": ("open_tree", (-1, 0, BAD_FLAGS)),  # EINVAL
    "syscall.mount_setattr": ("mount_setattr", (-1, 0, BAD_FLAGS, 0, 0)),  # EINVAL
    "syscall.pivot_root": ("pivot_root", (0, 0)),  # CAP FIRST
    "syscall.chroot": ("chroot", (0,)),  # path NULL -> EFAULT
    "syscall.setns": ("setns", (-1, 0)),  # EBADF
    # file handles: open any inode of a mount by number, bypassing path checks.
    "syscall.open_by_handle_at": ("open_by_handle_at", (-1, 0, 0)),
    "syscall.name_to_handle_at": ("name_to_handle_at", (-1, 0, 0, 0, BAD_FLAGS)),  # EINVAL
    # the host kernel itself.
    "syscall.kexec_load": ("kexec_load", (0, 0, 0, BAD_FLAGS)),  # CAP FIRST
    "syscall.kexec_file_load": ("kexec_file_load", (-1, -1, 0, 0, BAD_FLAGS)),  # CAP FIRST
    "syscall.init_module": ("init_module", (0, 0, 0)),  # CAP FIRST
    "syscall.finit_module": ("finit_module", (-1, 0, BAD_FLAGS)),  # CAP FIRST
    "syscall.delete_module": ("delete_module", (0, BAD_FLAGS)),  # CAP FIRST
    "syscall.reboot": ("reboot", (0, 0, 0, 0)),  # CAP FIRST; bad magic -> EINVAL
    "syscall.swapon": ("swapon", (0, BAD_FLAGS)),  # EINVAL
    "syscall.swapoff": ("swapoff", (0,)),  # CAP FIRST
    # CAP FIRST; then path 1 -> EFAULT (a NULL path would switch accounting off)
    "syscall.acct": ("acct", (1,)),
    "syscall.quotactl": ("quotactl", (0xFF, 0, 0, 0)),  # quota type 255 -> EINVAL
    "syscall.quotactl_fd": ("quotactl_fd", (-1, 0xFF, 0, 0)),  # EBADF
    # the clock every container shares with the host.
    "syscall.clock_settime": ("clock_settime", (0, 0)),  # tp NULL -> EFAULT
    "syscall.settimeofday": ("settimeofday", (1, 0)),  # tv = 1 -> EFAULT
    "syscall.clock_adjtime": ("clock_adjtime", (0, 0)),  # EFAULT
    "syscall.adjtimex": ("adjtimex", (0,)),  # EFAULT
    # dropped relative to Docker's default profile (policies/README.md says why).
    "syscall.memfd_create": ("memfd_create", (0, 0)),  # name NULL -> EFAULT
    "syscall.execveat": ("execveat", (-1, 0, 0, 0, BAD_FLAGS)),  # EINVAL
    "syscall.splice": ("splice", (-1, 0, -1, 0, 1, 0)),  # EBADF
    "syscall.vmsplice": ("vmsplice", (-1, 0, 0, 0)),  # EBADF
    "syscall.tee": ("tee", (-1, -1, 1, 0)),  # EBADF
    "syscall.inotify_init1": ("inotify_init1", (BAD_FLAGS,)),  # EINVAL
    "syscall.io_setup": ("io_setup", (0, 0)),  # ctxp NULL -> EFAULT
    "syscall.msgctl": ("msgctl", (-1, 9999, 0)),  # EINVAL
    "syscall.shmctl": ("shmctl", (-1, 9999, 0)),  # EINVAL
    "syscall.mq_open": ("mq_open", (0, 0, 0, 0)),  # name NULL -> EFAULT
    "syscall.pidfd_getfd": ("pidfd_getfd", (-1, -1, BAD_FLAGS)),  # EINVAL/EBADF
    "syscall.process_madvise": ("process_madvise", (-1, 0, 0, 0, BAD_FLAGS)),  # EINVAL
    "syscall.syslog": ("syslog", (9999, 0, 0)),  # CAP FIRST (dmesg_restrict)
    "syscall.modify_ldt": ("modify_ldt", (0, 0, 0)),  # read 0 bytes of the LDT: harmless
    # argument filters of allowed calls
    "ioctl.TIOCSTI": ("ioctl", (-1, 0x5412, 0)),  # EBADF
    "ioctl.TIOCSETD": ("ioctl", (-1, 0x5423, 0)),  # line discipline; EBADF
    "prlimit64.other_pid": ("prlimit64", (NO_SUCH_PID, 7, 0, 0)),  # ESRCH
}

# Address families refused by socket() (and socketpair(), which creates sockets of
# the same family). The type carries an invalid flag bit, so the kernel alone
# answers EINVAL and only seccomp answers EPERM; seccomp never sees the difference.
_REFUSED_FAMILIES: dict[str, int] = {
    "AF_PACKET": 17,
    "AF_ALG": 38,
    "AF_VSOCK": 40,
    "AF_KEY": 15,
    "AF_BLUETOOTH": 31,
    "AF_APPLETALK": 5,
    "AF_X25": 9,
    "AF_CAN": 29,
    "AF_TIPC": 30,
    "AF_RDS": 21,
    "AF_XDP": 44,
    "AF_NFC": 39,
    "AF_SMC": 43,
}
SOCK_DGRAM, SOCK_RAW = 2, 3


def _probe_refused(name: str, args: tuple[int, ...], expected: int = EPERM) -> Result:
    ret, err = _syscall(name, *args)
    if err is None and ret >= 0 and name in ("io_uring_setup", "userfaultfd", "memfd_create"):
        os.close(ret)  # cannot happen with the arguments above; never leak it anyway
    return _result(err, err == expected)


def _probe_socket(call: str, family: int, sock_type: int, protocol: int = 0) -> Result:
    pair = (ctypes.c_int * 2)(-1, -1)
    if call == "socket":
        ret, err = _syscall("socket", family, sock_type | SOCK_BAD_FLAG, protocol)
        created = [ret]
    else:
        ret, err = _syscall(
            "socketpair", family, sock_type | SOCK_BAD_FLAG, protocol, ctypes.addressof(pair)
        )
        created = list(pair)
    if err is None:  # impossible with an invalid flag; never leak a socket anyway
        for fd in created:
            if fd >= 0:
                os.close(fd)
    return _result(err, err == EPERM)


def _clone_newuser() -> int | None:
    ret, err = _syscall("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if ret == 0:  # we are the new process (the call was allowed): leave at once
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
    return err


def _personality(persona: int) -> int | None:
    return _syscall("personality", persona)[1]


def _child_refusal(body: Callable[[], int | None], expected: int = EPERM) -> Result:
    err, sig = _in_child(body)
    return _result(err, sig is None and err == expected)


def _int80_getpid() -> int | None:
    """Call i386 getpid (20) through ``int 0x80`` from this 64-bit process."""
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax,20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ret = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    return -ret if ret < 0 else None


def _x32_getpid() -> int | None:
    """Call getpid through the x32 ABI (x86_64 number with bit 30 set)."""
    number = X32_SYSCALL_BIT | _NR["getpid"][0]
    ctypes.set_errno(0)
    ret = _LIBC.syscall(ctypes.c_long(number))
    return ctypes.get_errno() if ret == -1 else None


def _abi_refusal(body: Callable[[], int | None]) -> Result:
    """Refused: killed with SIGSYS (seccomp's bad-architecture action), EPERM, or
    ENOSYS (the kernel was built without that ABI, e.g. x32)."""
    err, sig = _in_child(body)
    if sig is not None:
        return _result(None, sig == signal.SIGSYS)
    return _result(err, err in (EPERM, ENOSYS))


def refusal_probes() -> dict[str, Result]:
    results: dict[str, Result] = {}
    for probe, (name, args) in _REFUSED.items():
        if _NR[name][_ARCH_INDEX] >= 0:  # skip calls this architecture does not have
            results[probe] = _probe_refused(name, args)
    # clone3 is answered ENOSYS so that glibc falls back to clone (filtered below).
    results["syscall.clone3"] = _probe_refused("clone3", (0, 0), expected=ENOSYS)
    # These would succeed without seccomp (unprivileged user namespaces, personality
    # flags), so they run for real, in a throwaway child.
    results["syscall.unshare"] = _child_refusal(lambda: _syscall("unshare", CLONE_NEWUSER)[1])
    results["clone.CLONE_NEWUSER"] = _child_refusal(_clone_newuser)
    for flag_name, flag in (
        ("ADDR_NO_RANDOMIZE", ADDR_NO_RANDOMIZE),
        ("READ_IMPLIES_EXEC", READ_IMPLIES_EXEC),
    ):
        results[f"personality.{flag_name}"] = _child_refusal(functools.partial(_personality, flag))
    # Once undumpable, nothing in the sandbox may become dumpable again.
    results["prctl.PR_SET_DUMPABLE_1"] = _child_refusal(lambda: _syscall_prctl(PR_SET_DUMPABLE, 1))
    results["prctl.PR_SET_PTRACER"] = _child_refusal(lambda: _syscall_prctl(PR_SET_PTRACER, 0))
    for family_name, family in _REFUSED_FAMILIES.items():
        results[f"socket.{family_name}"] = _probe_socket("socket", family, SOCK_RAW)
        results[f"socketpair.{family_name}"] = _probe_socket("socketpair", family, SOCK_DGRAM)
    results["socket.AF_INET_SOCK_RAW"] = _probe_socket("socket", socket.AF_INET, SOCK_RAW, 1)
    results["socket.AF_INET6_SOCK_RAW"] = _probe_socket("socket", socket.AF_INET6, SOCK_RAW, 58)
    results["socket.AF_NETLINK_AUDIT"] = _probe_socket("socket", 16, SOCK_RAW, 9)
    results["socket.AF_NETLINK_NETFILTER"] = _probe_socket("socket", 16, SOCK_RAW, 12)
    if _IS_X86_64:
        results["abi.i386_int80"] = _abi_refusal(_int80_getpid)
        results["abi.x32"] = _abi_refusal(_x32_getpid)
    return results


# -- must-work checks -------------------------------------------------------------------


def _expect(condition: object, what: str) -> None:
    """Like assert, but never compiled away (``python -O``)."""
    if not condition:
        raise AssertionError(what)


def _stdlib_compute() -> None:
    import collections
    import datetime
    import decimal
    import hashlib
    import math
    import re
    import statistics
    import uuid

    data = json.loads(json.dumps({"items": [3, 1, 4, 1, 5, 9, 2, 6]}))["items"]
    _expect(collections.Counter(data).most_common(1) == [(1, 2)], "collections")
    _expect(statistics.median(data) == 3.5, "statistics")
    _expect(math.isclose(math.sqrt(2) ** 2, 2.0), "math")
    _expect(decimal.Decimal("0.1") + decimal.Decimal("0.2") == decimal.Decimal("0.3"), "decimal")
    _expect(re.findall(r"\d+", "a1b22c333") == ["1", "22", "333"], "re")
    _expect(hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf"), "hashlib")
    leap_day = datetime.datetime(2024, 2, 29, tzinfo=datetime.UTC)
    _expect((leap_day + datetime.timedelta(days=1)).month == 3, "datetime")
    _expect(datetime.datetime.now(datetime.UTC).year >= 2024, "datetime.now")
    _expect(uuid.uuid4().version == 4, "uuid")


def _threads() -> None:
    import threading

    squares: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        with lock:
            squares.append(n * n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_DEADLINE_S)
    _expect(sorted(squares) == [0, 1, 4, 9], "all threads ran")


def _thread_pool() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        _expect(list(pool.map(abs, range(-4, 4))) == [4, 3, 2, 1, 0, 1, 2, 3], "pool.map")


def _wait_exit_code(pid: int) -> int:
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"child {pid} did not finish")


def _fork_waitpid() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    _expect(_wait_exit_code(pid) == 3, "child exit code")


def _execv() -> None:
    # tini execs python3 this way; here a forked child replaces itself with python3.
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import os; os._exit(7)"])
        finally:
            os._exit(127)
    _expect(_wait_exit_code(pid) == 7, "exec'd python3 exit code")


def _pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"ping")
        _expect(os.read(read_fd, 4) == b"ping", "pipe round trip")
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _proc_self_status() -> None:
    with open("/proc/self/status", encoding="ascii") as handle:
        _expect("Seccomp:" in handle.read(), "/proc/self/status has Seccomp:")


def _tmp_file() -> None:
    path = f"/tmp/syscall-probe-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        _expect(os.read(fd, 8) == b"x" * 8, "read back")
        _expect(os.stat(path).st_size == 4096, "size")
    finally:
        os.close(fd)
        os.unlink(path)


def _filesystem_reads() -> None:
    _expect("etc" in os.listdir("/"), "listdir /")  # getdents64
    _expect(os.path.realpath("/proc/self/exe").startswith("/"), "realpath")  # readlink
    _expect(os.access("/usr/bin", os.R_OK), "access")
    os.stat("/etc/passwd")
    os.lstat("/etc/passwd")


def _socket(family: int, sock_type: int) -> Callable[[], None]:
    def check() -> None:
        socket.socket(family, sock_type).close()

    return check


def _socketpair_unix() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        _expect(right.recv(1) == b"x", "socketpair round trip")


def _connect_loopback() -> None:
    # Nothing listens, so the connection is refused; the system call must be allowed.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)  # ioctl(FIONBIO) + poll, as every socket with a timeout does
        try:
            sock.connect(("127.0.0.1", 9))
        except OSError as exc:
            if exc.errno == EPERM:
                raise


def _netlink_route() -> None:
    # glibc asks NETLINK_ROUTE for interfaces (if_nameindex, getaddrinfo's AI_ADDRCONFIG).
    _expect(any(name == "lo" for _, name in socket.if_nameindex()), "lo is listed")
    socket.getaddrinfo("localhost", 80, proto=socket.IPPROTO_TCP, flags=socket.AI_ADDRCONFIG)


def _signal_handler() -> None:
    hits: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: hits.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        _expect(hits == [signal.SIGUSR1], "handler ran")
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _Alarm(Exception):
    pass


def _interval_timer() -> None:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        try:
            time.sleep(CHILD_DEADLINE_S)
        except _Alarm:
            return
        raise AssertionError("SIGALRM never came")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sleep_and_clocks() -> None:
    start = time.monotonic()
    time.sleep(0.002)
    _expect(time.monotonic() - start >= 0.002, "slept")
    _expect(time.time() > 1.7e9, "wall clock")
    time.process_time()
    time.thread_time()


def _faulthandler() -> None:
    import faulthandler

    faulthandler.enable(file=2)  # sigaltstack + sigaction (fd 2: sys.stderr may be a buffer)
    faulthandler.disable()


def _agent_process_model() -> None:
    """What the agent does: pipe, fork, setpgid, pidfd + epoll, killpg, waitpid."""
    import selectors

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.closerange(3, write_fd)  # close_range
            os.write(write_fd, b"ready")
            time.sleep(CHILD_DEADLINE_S)
        finally:
            os._exit(0)
    os.close(write_fd)
    with contextlib.suppress(PermissionError, ProcessLookupError):
        os.setpgid(pid, pid)  # as the agent does; the child may have done it first
    os.set_blocking(read_fd, False)
    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    try:
        selector.register(read_fd, selectors.EVENT_READ, "pipe")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        events = selector.select(CHILD_DEADLINE_S)
        _expect(any(key.data == "pipe" for key, _ in events), "pipe readable")
        _expect(os.read(read_fd, 5) == b"ready", "child said ready")
        os.killpg(pid, signal.SIGKILL)
        # The pipe reaches EOF a moment before the pidfd turns readable: wait for the
        # exit event itself, as the agent does.
        deadline = time.monotonic() + CHILD_DEADLINE_S
        exited = False
        while not exited and time.monotonic() < deadline:
            for key, _ in selector.select(deadline - time.monotonic()):
                if key.data == "exit":
                    exited = True
                elif not os.read(read_fd, 64):
                    selector.unregister(read_fd)
        _expect(exited, "pidfd reported the exit")
        _, status = os.waitpid(pid, 0)
        _expect(os.WIFSIGNALED(status), "child killed by a signal")
        _expect(os.WTERMSIG(status) == signal.SIGKILL, "child killed by SIGKILL")
    finally:
        selector.close()
        os.close(pidfd)
        os.close(read_fd)


def _prctl_undumpable() -> None:
    # In a child: the probe itself must stay as it was for the other checks.
    def body() -> int | None:
        err = _syscall_prctl(PR_SET_DUMPABLE, 0)
        if err is not None:
            return err
        return None if _LIBC.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 else errno.EINVAL

    err, sig = _in_child(body)
    if err is not None or sig is not None:
        raise OSError(err or 0, f"prctl(PR_SET_DUMPABLE, 0) failed (signal {sig})")


def _process_info() -> None:
    import resource

    os.uname()
    os.sysconf("SC_PHYS_PAGES")  # sysinfo
    _expect(os.cpu_count(), "cpu_count")
    os.sched_getaffinity(0)
    resource.getrlimit(resource.RLIMIT_NOFILE)  # prlimit64(0, ...)
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    resource.getrusage(resource.RUSAGE_SELF)
    for query in (os.getpid, os.getppid, os.getuid, os.getgid, os.getgroups, os.getpgrp):
        query()
    os.times()
    _, err = _syscall("personality", PER_QUERY)
    if err is not None:
        raise OSError(err, "personality(0xffffffff) refused")


def _random_and_memory() -> None:
    _expect(len(os.urandom(32)) == 32, "urandom")
    with mmap.mmap(-1, 1 << 20) as region:  # mmap, munmap
        region[:4] = b"abcd"
    blob = bytearray(8 << 20)  # large allocations: mmap/mremap/madvise by malloc
    blob.extend(bytes(8 << 20))
    del blob


_WORKS: dict[str, Callable[[], None]] = {
    "works.stdlib_compute": _stdlib_compute,
    "works.threads": _threads,
    "works.thread_pool": _thread_pool,
    "works.fork_waitpid": _fork_waitpid,
    "works.execv_python": _execv,
    "works.pipe": _pipe,
    "works.proc_self_status": _proc_self_status,
    "works.tmp_file": _tmp_file,
    "works.filesystem_reads": _filesystem_reads,
    "works.socket_unix": _socket(socket.AF_UNIX, socket.SOCK_STREAM),
    "works.socket_unix_dgram": _socket(socket.AF_UNIX, socket.SOCK_DGRAM),
    "works.socket_inet": _socket(socket.AF_INET, socket.SOCK_STREAM),
    "works.socket_inet_udp": _socket(socket.AF_INET, socket.SOCK_DGRAM),
    "works.socket_inet6": _socket(socket.AF_INET6, socket.SOCK_STREAM),
    "works.socketpair_unix": _socketpair_unix,
    "works.connect_loopback": _connect_loopback,
    "works.netlink_route": _netlink_route,
    "works.signal_handler": _signal_handler,
    "works.interval_timer": _interval_timer,
    "works.sleep_and_clocks": _sleep_and_clocks,
    "works.faulthandler": _faulthandler,
    "works.agent_process_model": _agent_process_model,
    "works.prctl_undumpable": _prctl_undumpable,
    "works.process_info": _process_info,
    "works.random_and_memory": _random_and_memory,
}


def works_checks() -> dict[str, Result]:
    results: dict[str, Result] = {}
    for name, check in _WORKS.items():
        try:
            check()
        except OSError as exc:
            results[name] = _result(exc.errno, False)
        except Exception:  # a failed check is a result, not a crash
            results[name] = _result(None, False)
        else:
            results[name] = _result(None, True)
    return results


def run_probes() -> dict[str, Result]:
    """Every probe; refusals first, while no thread exists yet (they fork)."""
    results = refusal_probes()
    results.update(works_checks())
    return results


def main() -> int:
    sys.stdout.write(json.dumps(run_probes(), sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
