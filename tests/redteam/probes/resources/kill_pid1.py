# title: SIGKILL and SIGSTOP to PID 1 (tini) from inside its PID namespace
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"tini_alive": true}
# expect guards_off when runtime=gvisor: unjudged "gVisor's sandbox kernel does not drop a SIGKILL to the namespace's init, so tini dies and the sandbox with it; the host reaps the sandbox process, whose exit status does not always carry tini's: seen as crashed (blamed on the task) or as no result (agent_protocol_error): contained either way, not one outcome"
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
