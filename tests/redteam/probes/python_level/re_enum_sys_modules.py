# title: re -> enum -> sys -> sys.modules['os'] through allowed modules only
# threat: py.dynamic-import
# expect default: user_error@run "KeyError: 'os'"
# note: with the guards on, sys.modules is purged of everything outside the allowlist
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
import re

o = re.enum.sys.modules["os"]


def err(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return {1: "EPERM", 2: "ENOENT", 13: "EACCES", 30: "EROFS"}.get(exc.errno, exc.errno)


return {
    "uid": o.getuid(),
    "environ": sorted(o.environ),
    "proc1_environ": err(lambda: o.open("/proc/1/environ", o.O_RDONLY)),
    "etc_write": err(lambda: o.open("/etc/redteam", o.O_WRONLY | o.O_CREAT, 0o644)),
}
