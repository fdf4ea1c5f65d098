# title: SIGKILL and SIGSTOP to PID 1 (tini) from inside its PID namespace
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"tini_alive": true}
# expect guards_off when runtime=gvisor: crashed@run "Task killed its supervising agent (SIGKILL)"
# note: the kernel drops SIGKILL and SIGSTOP sent to a namespace's init from inside it
import random

o = random._os
o.kill(1, 9)
o.kill(1, 19)
o.kill(1, 0)
fd = o.open("/proc/1/stat", o.O_RDONLY)
state = o.read(fd, 256).decode().rsplit(")", 1)[1].split()[0]
o.close(fd)
return {"tini_alive": state in ("S", "R")}
