# title: SIGKILL the agent (the task's parent) so that nothing reports a result
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: crashed@run "Task container was killed by SIGKILL"
# note: tini exits with its child's status, so the container ends as killed; no result is invented
import random

random._os.kill(random._os.getppid(), 9)
while True:
    pass
