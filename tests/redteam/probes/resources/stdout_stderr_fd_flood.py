# title: raw writes to fds 1 and 2 past the output cap (through random._os)
# threat: res.disk-output
# limits: {"output_bytes": 1048576, "timeout_s": 30}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: output_limit_exceeded@run "Task output exceeded the limit of 1048576 bytes"
import random

chunk = b"y" * 65536
while True:
    random._os.write(1, chunk)
    random._os.write(2, chunk)
