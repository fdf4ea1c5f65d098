# title: /sys writes: uevent_helper, the cgroup release_agent, notify_on_release, cgroup.procs
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off when cgroup=v1: success {"uevent_helper": "ENOENT", "release_agent": "ENOENT", "notify_on_release": "EACCES", "cgroup_procs": "EACCES", "sys_mount": "ro", "memory_cgroup_mount": "ro"}
# expect guards_off when cgroup=v1,runtime=gvisor: success {"cgroup_procs": "ENOENT", "memory_cgroup_mount": "ro", "notify_on_release": "ENOENT", "release_agent": "ENOENT", "sys_mount": "ro", "uevent_helper": "ENOENT"}
# expect ablation when cgroup=v1: success {"uevent_helper": "ENOENT", "release_agent": "ENOENT", "notify_on_release": "EACCES", "cgroup_procs": "EACCES", "sys_mount": "ro", "memory_cgroup_mount": "ro"}
# expect ablation when cgroup=v1,runtime=gvisor: success {"cgroup_procs": "ENOENT", "memory_cgroup_mount": "ro", "notify_on_release": "ENOENT", "release_agent": "ENOENT", "sys_mount": "ro", "uevent_helper": "ENOENT"}
# layers: rootfs, uid
# note: release_agent exists only in a hierarchy's root cgroup, which a private cgroup namespace does not show; the files that exist are root's, on read-only mounts
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
    "uevent_helper": err(lambda: os.open("/sys/kernel/uevent_helper", os.O_WRONLY)),
    "release_agent": err(lambda: os.open("/sys/fs/cgroup/memory/release_agent", os.O_WRONLY)),
    "notify_on_release": err(
        lambda: os.open("/sys/fs/cgroup/memory/notify_on_release", os.O_WRONLY)
    ),
    "cgroup_procs": err(lambda: os.open("/sys/fs/cgroup/memory/cgroup.procs", os.O_WRONLY)),
    "sys_mount": mount_of("/sys/kernel"),
    "memory_cgroup_mount": mount_of("/sys/fs/cgroup/memory/cgroup.procs"),
}
