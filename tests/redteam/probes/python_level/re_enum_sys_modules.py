# title: re -> enum -> sys -> sys.modules['os'] through allowed modules only
# threat: py.dynamic-import
# expect default: security_violation@run "Import of standard library module 'sys' is disallowed"
# note: with the guards on, re.enum is a module proxy and sys is not on the allowlist: refused when it is read (b3a21b2 handed sys over and only the purged sys.modules stopped it)
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
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
