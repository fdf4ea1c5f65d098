# title: fork bomb through random._os.fork (an allowed module), guards on or off
# threat: res.bombs
# limits: {"pids": 32, "timeout_s": 20}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: pids_limit_exceeded@run "Task hit the process limit (32 processes and threads)"
# expect guards_off when runtime=gvisor: unjudged "under gVisor (runsc 2022, ptrace platform) the bomb ends either as memory_limit_exceeded or with the sandbox kernel dying when its own threads hit the pids cgroup (agent_protocol_error): contained either way, not one outcome"
import random

while True:
    random._os.fork()
