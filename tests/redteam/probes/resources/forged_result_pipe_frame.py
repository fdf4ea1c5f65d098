# title: a broken frame written straight onto the task's own result pipe (every fd from 3 up)
# threat: res.disk-output
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: agent_protocol_error@result "Failed to read result from child process"
# note: the task can only spoil its own answer: the agent refuses the frame and says so; the runner serves on
import random

o = random._os
for fd in range(3, 64):
    try:
        o.write(fd, (5).to_bytes(4, "big") + b'{"x":')
    except OSError:
        pass
return "never seen"
