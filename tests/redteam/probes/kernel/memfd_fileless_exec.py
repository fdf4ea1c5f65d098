# title: fileless execution: memfd_create + execveat of a copy of /bin/true, past noexec /tmp
# threat: k.over-capable
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"memfd_create": "EPERM"}
# expect ablation: success {"memfd_create": "ok", "fexecve": "ran"}
# layers: none
# ours: refuses
# note: Docker's profile allows it; the copy runs with the task's own uid and limits, so this widens what runs, not who runs it
import os

try:
    fd = os.memfd_create("redteam", 0)
except PermissionError:
    return {"memfd_create": "EPERM"}
with open("/bin/true", "rb") as handle:
    os.write(fd, handle.read())
pid = os.fork()
if pid == 0:
    try:
        os.execve(fd, ["true"], {})
    finally:
        os._exit(99)
_, status = os.waitpid(pid, 0)
return {
    "memfd_create": "ok",
    "fexecve": "ran" if os.waitstatus_to_exitcode(status) == 0 else "failed",
}
