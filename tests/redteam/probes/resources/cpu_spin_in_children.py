# title: CPU spin in forked children in their own sessions (out of the task's process group)
# threat: res.bombs
# limits: {"timeout_s": 2}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: timeout@run "Task execution timed out after 2 seconds"
import random

o = random._os
for _ in range(3):
    if o.fork() == 0:
        o.setsid()
        while True:
            pass
while True:
    pass
