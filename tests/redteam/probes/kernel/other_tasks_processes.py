# title: see or signal another task's processes (the listener runs meanwhile)
# threat: k.cross-task
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"pid1": "tini", "foreign_processes": [], "kill_all": "only own pid namespace"}
# expect ablation: success {"pid1": "tini", "foreign_processes": [], "kill_all": "only own pid namespace"}
# layers: pidns
# ours: allows
import random

o = random._os
mine = {"1", str(o.getppid()), str(o.getpid())}
foreign = []
for pid in o.listdir("/proc"):
    if pid.isdigit() and pid not in mine:
        fd = o.open(f"/proc/{pid}/comm", o.O_RDONLY)
        foreign.append(o.read(fd, 64).decode().strip())
        o.close(fd)
fd = o.open("/proc/1/comm", o.O_RDONLY)
pid1 = o.read(fd, 64).decode().strip()
o.close(fd)
# signal 0 to every process we may signal: only our own namespace is visible
o.kill(-1, 0)
return {"pid1": pid1, "foreign_processes": foreign, "kill_all": "only own pid namespace"}
