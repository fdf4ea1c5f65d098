# title: subclasses walk from a tuple to os._wrap_close and its module globals
# threat: py.introspection
# expect default: security_violation@analyze "Access to attribute '__subclasses__' is disallowed"
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
classes = ().__class__.__bases__[0].__subclasses__()
wrap_close = [c for c in classes if c.__name__ == "_wrap_close"][0]
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
