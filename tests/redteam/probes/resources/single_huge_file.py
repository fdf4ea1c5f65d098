# title: one file past RLIMIT_FSIZE
# threat: res.disk-output
# limits: {"tmpfs_bytes": 16777216, "fsize_bytes": 2097152}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"errno": "EFBIG", "written": 2097152}
import random

o = random._os
fd = o.open("/tmp/huge", o.O_WRONLY | o.O_CREAT, 0o600)
written = 0
try:
    while True:
        written += o.write(fd, b"z" * 65536)
except OSError as exc:
    code = {28: "ENOSPC", 27: "EFBIG"}.get(exc.errno, exc.errno)
return {"errno": code, "written": written}
