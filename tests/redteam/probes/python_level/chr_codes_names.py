# title: attribute names from chr() codes, looked up through vars() of the class chain
# threat: py.runtime-names
# expect default: user_error@run "name 'vars' is not defined"
# expect guards_off: success {"uid": 10001, "environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "proc1_environ": "EACCES", "etc_write": "EROFS"}
# expect guards_off when runtime=gvisor: success {"environ": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
name = "".join(map(chr, [95, 95, 115, 117, 98, 99, 108, 97, 115, 115, 101, 115, 95, 95]))
subclasses = vars(type)[name].__get__(object)()
wrap_close = [c for c in subclasses if "_wrap_close" in repr(c)][0]
init = vars(wrap_close)["".join(map(chr, [95, 95, 105, 110, 105, 116, 95, 95]))]
o = getattr(init, "".join(map(chr, [95, 95, 103, 108, 111, 98, 97, 108, 115, 95, 95])))[
    "sys"
].modules["os"]


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
