# title: SIGKILL the agent (the task's parent) so that nothing reports a result
# threat: res.lifecycle
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: crashed@run "Task killed its supervising agent (SIGKILL)"
# expect guards_off when runtime=gvisor: unjudged "under gVisor the host reaps the sandbox process, whose exit status does not always carry tini's: the agent's death is seen as crashed (blamed on the task) or as no result (agent_protocol_error): contained either way, not one outcome"
# note: tini exits with its child's status, so the container ends as killed; no result is invented, and the Docker daemon recorded no kill, so the task is blamed (not a stop from outside)
import random

random._os.kill(random._os.getppid(), 9)
while True:
    pass
