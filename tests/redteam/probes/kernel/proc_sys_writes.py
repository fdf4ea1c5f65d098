# title: writes to /proc/sys (core_pattern, kernel.modprobe, vm.overcommit), /proc/sysrq-trigger, PID 1's oom_score_adj
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"core_pattern": "EACCES", "overcommit": "EACCES", "modprobe": "ENOENT", "sysrq": "ENOENT", "oom_score_adj_pid1": "EACCES", "proc_sys_mount": "ro"}
# expect guards_off when runtime=gvisor: success {"core_pattern": "ENOENT", "modprobe": "ENOENT", "oom_score_adj_pid1": "ok", "overcommit": "EACCES", "proc_sys_mount": "rw", "sysrq": "ENOENT"}
# expect ablation: success {"core_pattern": "EACCES", "overcommit": "EACCES", "modprobe": "ENOENT", "sysrq": "ENOENT", "oom_score_adj_pid1": "EACCES", "proc_sys_mount": "ro"}
# expect ablation when runtime=gvisor: success {"core_pattern": "ENOENT", "modprobe": "ENOENT", "oom_score_adj_pid1": "ok", "overcommit": "EACCES", "proc_sys_mount": "rw", "sysrq": "ENOENT"}
# layers: rootfs, uid
# note: the root-owned files answer EACCES to uid 10001 first; behind that Docker mounts /proc/sys read-only. modprobe and sysrq-trigger do not exist on this kernel
import os


def err(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return {1: "EPERM", 2: "ENOENT", 13: "EACCES", 30: "EROFS", 22: "EINVAL"}.get(
            exc.errno, exc.errno
        )


def mount_of(path):
    best = ("", "")
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = fields[4]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(
                best[0]
            ):
                best = (point, fields[5].split(",")[0])
    return best[1]


return {
    "core_pattern": err(lambda: os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY)),
    "overcommit": err(lambda: os.open("/proc/sys/vm/overcommit_memory", os.O_WRONLY)),
    "modprobe": err(lambda: os.open("/proc/sys/kernel/modprobe", os.O_WRONLY)),
    "sysrq": err(lambda: os.open("/proc/sysrq-trigger", os.O_WRONLY)),
    "oom_score_adj_pid1": err(lambda: os.open("/proc/1/oom_score_adj", os.O_WRONLY)),
    "proc_sys_mount": mount_of("/proc/sys/kernel/core_pattern"),
}
