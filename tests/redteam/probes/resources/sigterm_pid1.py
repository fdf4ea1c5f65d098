# title: SIGTERM to PID 1 (tini): it forwards it to the agent, the container ends
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: crashed@run "Task killed its supervising agent (SIGTERM)"
# note: a clear error and the runner serves on; the Docker daemon recorded no kill, so the signal is blamed on the task, not on a stop from outside
import random

random._os.kill(1, 15)
while True:
    pass
