# title: every /proc/<pid>/cmdline and environ in the container, searched for secrets
# threat: py.secrets
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# note: even the task's own environ is closed: it is forked from the undumpable agent, so /proc/<pid>/environ is root's
# expect guards_off: success {"pids_seen": true, "matches": [], "environ_readable": []}
# expect guards_off when runtime=gvisor: success {"environ_readable": ["1", "2", "self"], "matches": [], "pids_seen": true}
import os
import re

pattern = re.compile(rb"rt(?:canary|token)-[0-9a-f]{32}|N8N_RUNNERS")
matches, readable = [], []
me = os.getpid()
for pid in (p for p in os.listdir("/proc") if p.isdigit()):
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        if name == "environ" and int(pid) == me:
            readable.append("self")
        elif name == "environ":
            readable.append(pid)
        matches += [m.decode() for m in pattern.findall(data)]
return {"pids_seen": len(os.listdir("/proc")) > 3, "matches": matches, "environ_readable": readable}
