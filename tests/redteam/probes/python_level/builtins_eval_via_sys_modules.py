# title: the real builtins module from sys.modules (through re -> enum -> sys), then eval with them
# threat: py.introspection
# note: b3a21b2: a full bypass of the speed bumps with the default policy; now the module proxy refuses re.enum.sys (not on the allowlist). With guards off only the container stands
# expect default: security_violation@run "Import of standard library module 'sys' is disallowed"
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
import re

real = re.enum.sys.modules["builtins"]
scope = {"".join(["__", "builtins", "__"]): real}
o = real.eval("__import__('os')", scope)


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
