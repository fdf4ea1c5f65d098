"""The canary tasks: their code (run under the real isolation with the guards off)
and how far past a limit they go; the answers only our seccomp profile gives."""

from __future__ import annotations

from runner.analyzer import ImportPolicy
from runner.sandbox.base import GuardConfig

# The in-process guards off: the canary must read /proc and call the kernel itself.
CANARY_GUARDS = GuardConfig(
    stdlib_allow=("*",), external_allow=("*",), builtins_deny=(), block_env_access=False
)
CANARY_IMPORTS = ImportPolicy(frozenset({"*"}), frozenset({"*"}))
# How far past its limit a canary goes before it gives up (when a limit does not bite).
OVERSHOOT = 4

# Answers under our profile (policies/README.md 1.9): each of these is allowed by
# Docker's default profile, which answers with the kernel's own error instead. The
# same under gVisor, which applies our profile inside its kernel (``--oci-seccomp``):
# its own answers would be ENOSYS, ESRCH and EAFNOSUPPORT. clone3's ENOSYS comes from
# a rule gVisor would answer EPERM as written, so the OCI backend renders it in a
# form gVisor answers ENOSYS too (runner/sandbox/oci/config.py): EPERM there made
# every thread start fail.
OUR_PROFILE_ANSWERS = {
    "io_uring_setup": "EPERM",  # Docker's default: EFAULT
    "ptrace_peekdata": "EPERM",  # Docker's default: ESRCH
    "socket_af_vsock": "EPERM",  # Docker's default: EINVAL
    "clone3": "ENOSYS",  # both: glibc then falls back to the filtered clone
}

FACTS_CANARY = r"""
import ctypes, errno, os, platform, resource, socket, threading

def status(name):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None

def first_readable(paths):
    for path in paths:
        try:
            with open(path) as handle:
                return handle.read().strip()
        except OSError:
            continue
    return None

def name_of(code):
    return errno.errorcode.get(code, str(code))

# Raw system calls with arguments the kernel itself rejects (EFAULT, ESRCH, EINVAL):
# only a seccomp filter answers EPERM, and nothing can succeed by accident.
NUMBERS = {
    "x86_64": {"io_uring_setup": 425, "ptrace": 101, "socket": 41, "clone3": 435},
    "aarch64": {"io_uring_setup": 425, "ptrace": 117, "socket": 198, "clone3": 435},
}.get(platform.machine())
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(name, *args):
    if NUMBERS is None:
        return "unknown architecture " + platform.machine()
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NUMBERS[name]), *(ctypes.c_long(a) for a in args))
    if ret == -1:
        return name_of(ctypes.get_errno())
    if name == "socket" and ret >= 0:
        os.close(ret)
    return "succeeded"

def prctl(option):
    ctypes.set_errno(0)
    ret = libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(0) for _ in range(4)))
    return ret if ret >= 0 else name_of(ctypes.get_errno())

def root_mount_options():
    # The per-mount options of what is mounted at /: the last such line is on top.
    found = None
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 5 and fields[4] == "/":
                found = fields[5]
    return found

def tasks():
    # Every process and thread in the container's PID namespace, as counted against
    # a pids limit (the pids cgroup under Linux, RLIMIT_NPROC under gVisor).
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += len(os.listdir("/proc/" + entry + "/task"))
            except OSError:
                continue
    return count

facts = {
    "uid": os.getuid(), "gid": os.getgid(),
    "seccomp": status("Seccomp"), "no_new_privs": status("NoNewPrivs"),
    "no_new_privs_prctl": prctl(39),  # PR_GET_NO_NEW_PRIVS
    "cap_eff": status("CapEff"), "cap_prm": status("CapPrm"),
    "cap_bnd": status("CapBnd"), "cap_amb": status("CapAmb"), "cap_inh": status("CapInh"),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "syscalls": {
        "io_uring_setup": call("io_uring_setup", 1, 0),
        "ptrace_peekdata": call("ptrace", 2, 0x3FFFFFFF, 0, 0),
        "socket_af_vsock": call("socket", 40, 3 | 0x40000000, 0),
        "clone3": call("clone3", 0, 0),
    },
    "apparmor": first_readable(["/proc/self/attr/apparmor/current", "/proc/self/attr/current"]),
    "memory_limit": first_readable(
        ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    ),
    "pids_max": first_readable(["/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"]),
    "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
    "root_mount": root_mount_options(),
}

# The CPU quota in force, as the kernel sees it. cgroup v2 has cgroup.controllers at
# its root and "quota period" (or "max period") in cpu.max; v1 has one file each,
# where the quota -1 means unlimited. Detected here, never assumed from the host.
if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
    quota, _, period = (first_readable(["/sys/fs/cgroup/cpu.max"]) or "").partition(" ")
    facts["cpu"] = {"cgroup": "v2", "quota": quota or None, "period": period or None}
else:
    v1 = ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct,cpu"]
    facts["cpu"] = {
        "cgroup": "v1",
        "quota": first_readable([d + "/cpu.cfs_quota_us" for d in v1]),
        "period": first_readable([d + "/cpu.cfs_period_us" for d in v1]),
    }
try:
    fd = os.open("/.sandbox-selfcheck", os.O_WRONLY | os.O_CREAT, 0o600)
except OSError as exc:
    facts["root_write"] = name_of(exc.errno)
else:
    os.close(fd)
    facts["root_write"] = "written"

# Last, as nothing else may need a new process meanwhile: threads until the limit
# refuses one (or the cap, when no limit bites), then release them all. The tasks
# there before count against the same limit.
facts["tasks_before"] = tasks()
release, started, refused = threading.Event(), [], None
try:
    while len(started) < _items[0]["json"]["threadCap"]:
        thread = threading.Thread(target=release.wait, args=(30,))
        thread.start()
        started.append(thread)
except (RuntimeError, OSError) as exc:
    refused = type(exc).__name__ + ": " + str(exc)
finally:
    release.set()
    for thread in started:
        thread.join(30)
facts["threads_started"] = len(started)
facts["thread_refused"] = refused
return facts
"""

MEMORY_CANARY = r"""
hog, chunk = [], b"\x01" * (4 * 1024 * 1024)
while len(hog) * 4 < _items[0]["json"]["capMb"]:
    hog.append(bytearray(chunk))  # a copy: every page is written, so it really counts
return {"allocatedMb": len(hog) * 4}
"""
