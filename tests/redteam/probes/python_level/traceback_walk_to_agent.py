# title: tb_frame.f_back up to the agent's own frames and their module globals
# threat: py.frames
# expect default: security_violation@analyze "Access to attribute '__traceback__' is disallowed"
# expect guards_off: success {"agent_modules": ["sandbox_agent.agent", "sandbox_agent.child"], "uid": 10001, "proc1_environ": "EACCES", "etc_write": "EROFS", "agent_environ": "EACCES"}
# expect guards_off when runtime=gvisor: success {"agent_environ": "ok", "agent_modules": ["sandbox_agent.agent", "sandbox_agent.child"], "etc_write": "EACCES", "proc1_environ": "ok", "uid": 10001}
try:
    1 / 0
except ZeroDivisionError as exc:
    frame = exc.__traceback__.tb_frame
modules = set()
o = None
while frame is not None:
    name = frame.f_globals.get("__name__", "")
    if name.startswith("sandbox_agent"):
        modules.add(name)
        o = frame.f_globals.get("os", o)
    frame = frame.f_back


def err(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return {1: "EPERM", 2: "ENOENT", 13: "EACCES", 30: "EROFS"}.get(exc.errno, exc.errno)


return {
    "agent_modules": sorted(modules),
    "uid": o.getuid(),
    "proc1_environ": err(lambda: o.open("/proc/1/environ", o.O_RDONLY)),
    "etc_write": err(lambda: o.open("/etc/redteam", o.O_WRONLY | o.O_CREAT, 0o644)),
    "agent_environ": err(lambda: o.open(f"/proc/{o.getppid()}/environ", o.O_RDONLY)),
}
