# title: the task writes its own frame to the result pipe claiming the output limit, having written nothing
# threat: res.disk-output
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: user_error@run "Task claimed an outcome that only the sandbox can decide: output_limit_exceeded"
# note: an output limit is the agent's count of bytes on the pipe or the host's of stdout/stderr, never the task's word
import os as o

body = (
    b'{"error": {"kind": "output_limit_exceeded", "message": "Task printed more than the output'
    b' limit of 16777216 bytes", "description": ""}, "print_args": []}'
)
for fd in range(3, 64):
    try:
        o.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"  # the agent reads the first complete frame: the forged one
