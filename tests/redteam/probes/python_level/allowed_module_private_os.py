# title: random._os: an allowed module hands over os itself (guards are speed bumps)
# threat: py.dynamic-import
# note: the default policy lets this through on purpose (random is allowed); the container holds and the environment is already empty
# expect default: success {"uid": 10001, "environ": [], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
import random

o = random._os


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
