# title: the agent process (the task's parent): its memory, environ, fds and cmdline
# threat: py.secrets
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"mem": "EACCES", "environ": "EACCES", "fd": "EACCES", "cmdline_secret": false, "ptrace_attach": "EPERM"}
# expect guards_off when runtime=gvisor: success {"cmdline_secret": false, "environ": "opened", "fd": "listed", "mem": "EACCES", "ptrace_attach": "EPERM"}
import ctypes
import os

agent = os.getppid()


def attempt(path, flags=os.O_RDONLY):
    try:
        os.close(os.open(path, flags))
        return "opened"
    except OSError as exc:
        return {1: "EPERM", 13: "EACCES"}.get(exc.errno, exc.errno)


with open(f"/proc/{agent}/cmdline", "rb") as handle:
    cmdline = handle.read()
libc = ctypes.CDLL(None, use_errno=True)
ptrace = "EPERM" if libc.ptrace(16, agent, 0, 0) == -1 and ctypes.get_errno() == 1 else "attached"
try:
    fds = os.listdir(f"/proc/{agent}/fd")
    fd = "listed"
except PermissionError:
    fd = "EACCES"
return {
    "mem": attempt(f"/proc/{agent}/mem", os.O_RDWR),
    "environ": attempt(f"/proc/{agent}/environ"),
    "fd": fd,
    "cmdline_secret": b"rtcanary-" in cmdline or b"rttoken-" in cmdline,
    "ptrace_attach": ptrace,
}
