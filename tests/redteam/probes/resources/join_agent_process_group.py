# title: move into the agent's process group (so killing the child's group misses it), then spin past the timeout
# threat: res.bombs
# limits: {"timeout_s": 2}
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: timeout@run "Task execution timed out after 2 seconds"
# note: the child has a session of its own (joining the agent's group is refused) and the agent ends every task process with kill(-1); the agent reports the timeout itself, not the host's deadline 5 s later (tests/integration/test_limits.py asserts which)
import os as o

try:
    o.setpgid(0, o.getpgid(o.getppid()))
except OSError:
    pass
while True:
    pass
