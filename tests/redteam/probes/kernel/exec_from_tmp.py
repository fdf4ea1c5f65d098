# title: run a binary written to /tmp (copy of /bin/true), and a script with a shebang
# threat: k.over-capable
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"binary": "EACCES", "script": "EACCES"}
# expect ablation: success {"binary": "EACCES", "script": "EACCES"}
# layers: tmpfs, rootfs
import os
import shutil

shutil.copy("/bin/true", "/tmp/true")
os.chmod("/tmp/true", 0o755)
with open("/tmp/run.sh", "w") as handle:
    handle.write("#!/bin/sh\nexit 0\n")
os.chmod("/tmp/run.sh", 0o755)


def run(path):
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(path, [path])
        except OSError as exc:
            os._exit(100 + exc.errno)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: "ran", 113: "EACCES", 101: "EPERM"}.get(code, code)


return {"binary": run("/tmp/true"), "script": run("/tmp/run.sh")}
