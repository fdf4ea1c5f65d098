# title: SIGSTOP the agent so it cannot enforce the timeout; the host deadline must
# threat: res.lifecycle
# limits: {"timeout_s": 1}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: timeout@run "Task execution timed out after 1 second"
import random

random._os.kill(random._os.getppid(), 19)
while True:
    pass
