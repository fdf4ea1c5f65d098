# title: type.__dict__ descriptor __get__ reaches __subclasses__ without the attribute syntax
# threat: py.introspection
# expect default: security_violation@analyze "Access to attribute '__dict__' is disallowed"
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
subclasses = type.__dict__["__subclasses__"].__get__(object)()
wrap_close = [c for c in subclasses if "_wrap_close" in repr(c)][0]
o = wrap_close.__init__.__globals__["sys"].modules["os"]


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
