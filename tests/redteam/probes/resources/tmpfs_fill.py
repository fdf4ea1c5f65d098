# title: fill /tmp until the tmpfs cap
# threat: res.disk-output
# limits: {"tmpfs_bytes": 8388608, "fsize_bytes": 67108864}
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"errno": "ENOSPC", "written_near_cap": true}
import random

o = random._os
fd = o.open("/tmp/fill", o.O_WRONLY | o.O_CREAT, 0o600)
written = 0
try:
    while True:
        written += o.write(fd, b"z" * 65536)
except OSError as exc:
    code = {28: "ENOSPC", 27: "EFBIG"}.get(exc.errno, exc.errno)
return {"errno": code, "written_near_cap": 6 * 1024 * 1024 <= written <= 8 * 1024 * 1024}
