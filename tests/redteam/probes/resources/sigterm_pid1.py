# title: SIGTERM to PID 1 (tini): it forwards it to the agent, the container ends
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: crashed@run "Task container was killed by SIGTERM"
# note: a clear error and the runner serves on; the description blames a stop "from outside", which here came from the task itself
import random

random._os.kill(1, 15)
while True:
    pass
