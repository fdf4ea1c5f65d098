# title: files another task left in /tmp or /var/tmp (and no /dev/shm at all) (containers are never reused)
# threat: k.cross-task
# expect default: security_violation@analyze "Access to private attribute '_os' of imported name 'random'"
# expect guards_off: success {"tmp": [], "dev_shm": false, "var_tmp": "EROFS"}
# expect guards_off when runtime=gvisor: success {"dev_shm": true, "tmp": [], "var_tmp": "EACCES"}
# expect ablation: success {"tmp": [], "dev_shm": false, "var_tmp": "EROFS"}
# expect ablation when runtime=gvisor: success {"dev_shm": true, "tmp": [], "var_tmp": "EACCES"}
# layers: runner, tmpfs, rootfs
# note: the listener wrote /tmp/redteam-listener in its own container; every task gets a fresh one
import random

o = random._os
try:
    o.close(o.open("/var/tmp/redteam", o.O_WRONLY | o.O_CREAT, 0o600))
    var_tmp = "written"
except OSError as exc:
    var_tmp = {30: "EROFS", 13: "EACCES"}.get(exc.errno, exc.errno)
return {"tmp": sorted(o.listdir("/tmp")), "dev_shm": o.path.exists("/dev/shm"), "var_tmp": var_tmp}
