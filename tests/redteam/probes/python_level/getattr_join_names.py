# title: getattr with attribute names joined at run time (the analyzer cannot see them)
# threat: py.runtime-names
# expect default: user_error@run "name 'getattr' is not defined"
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
def dunder(word):
    return "".join(["_", "_", word, "_", "_"])


cls = getattr((), dunder("class"))
base = getattr(cls, dunder("base"))
subclasses = getattr(base, dunder("subclasses"))()
wrap_close = [c for c in subclasses if "_wrap_close" in repr(c)][0]
o = getattr(getattr(wrap_close, dunder("init")), dunder("globals"))["sys"].modules["os"]


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
