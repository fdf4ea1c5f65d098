# title: inode exhaustion: empty files in /tmp until something stops it
# threat: res.disk-output
# limits: {"timeout_s": 30, "tmpfs_bytes": 1048576, "memory_bytes": 67108864}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: memory_limit_exceeded@run "Task ran out of memory (limit 64 MiB)"
# note: empty files cost no blocks, so the size cap never bites; their inodes are charged to the task's memory cgroup, which does
import random

o = random._os
o.mkdir("/tmp/inodes")
n = 0
try:
    while n < 2_000_000:
        o.close(o.open(f"/tmp/inodes/{n}", o.O_WRONLY | o.O_CREAT, 0o600))
        n += 1
    stopped = "none"
except OSError as exc:
    stopped = {28: "ENOSPC", 24: "EMFILE", 12: "ENOMEM"}.get(exc.errno, exc.errno)
return {"stopped_by": stopped}
