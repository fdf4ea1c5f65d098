# title: the task writes its own frame to the result pipe claiming a timeout that never happened
# threat: res.disk-output
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: user_error@run "Task claimed an outcome that only the sandbox can decide: timeout"
# note: only the agent's deadline and the host's decide a timeout; the claim is the task's own error
import os as o

body = (
    b'{"error": {"kind": "timeout", "message": "Task execution timed out after 60 seconds",'
    b' "description": ""}, "print_args": []}'
)
for fd in range(3, 64):
    try:
        o.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"  # the agent reads the first complete frame: the forged one
