# title: fork bomb through random._os.fork (an allowed module), guards on or off
# threat: res.bombs
# limits: {"pids": 32, "timeout_s": 20}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: pids_limit_exceeded@run "Task hit the process limit (32 processes and threads)"
# expect guards_off when runtime=gvisor: user_error@run "Resource temporarily unavailable"
import random

while True:
    random._os.fork()
