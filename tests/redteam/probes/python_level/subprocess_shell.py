# title: subprocess (outside the allowlist): a shell that reads secrets and writes the image
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'subprocess' is disallowed"
# expect guards_off: success {"id": "uid=10001(sandbox) gid=10001(sandbox) groups=10001(sandbox)", "cat_proc1_environ": 1, "touch_usr": 1, "sudo": 127}
# expect guards_off when runtime=gvisor: success {"cat_proc1_environ": 0, "id": "uid=10001(sandbox) gid=10001(sandbox) groups=10001(sandbox)", "sudo": 127, "touch_usr": 1}
import subprocess


def sh(command):
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True)


return {
    "id": sh("id").stdout.strip(),
    "cat_proc1_environ": sh("cat /proc/1/environ > /dev/null 2>&1").returncode,
    "touch_usr": sh("touch /usr/redteam 2>/dev/null").returncode,
    "sudo": sh("sudo id 2>/dev/null").returncode,
}
