# title: double-fork daemon in its own session that would outlive the task
# threat: res.bombs
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"returned_while_daemon_runs": true}
# note: the task returns at once; the daemon dies with its container (the suite checks no container of this runner is left)
import random

o = random._os
if o.fork() == 0:
    o.setsid()
    if o.fork() == 0:
        while True:
            fd = o.open("/tmp/daemon", o.O_WRONLY | o.O_CREAT | o.O_APPEND, 0o600)
            o.write(fd, b".")
            o.close(fd)
    o._exit(0)
o.waitpid(-1, 0)
return {"returned_while_daemon_runs": True}
