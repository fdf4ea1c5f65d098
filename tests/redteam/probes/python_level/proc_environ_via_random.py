# title: /proc/self, the agent's and /proc/1/environ read through random._os (allowed module)
# threat: py.secrets
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"self": "EACCES", "agent": "EACCES", "proc1": "EACCES"}
# expect guards_off when runtime=gvisor: success {"agent": "read", "proc1": "read", "self": "read"}
# note: all three belong to root: tini is execute-only, the agent undumpable, the task forked from it
import random

o = random._os


def read(path):
    try:
        fd = o.open(path, o.O_RDONLY)
    except PermissionError:
        return "EACCES"
    raw = o.read(fd, 65536).decode("latin-1")
    o.close(fd)
    return "secret" if "rtcanary-" in raw or "rttoken-" in raw else "read"


return {
    "self": read("/proc/self/environ"),
    "agent": read(f"/proc/{o.getppid()}/environ"),
    "proc1": read("/proc/1/environ"),
}
