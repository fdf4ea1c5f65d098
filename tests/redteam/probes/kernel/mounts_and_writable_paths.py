# title: host mounts and writable places: mount table, writable mounts, the image's own files
# threat: k.over-capable
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off when cgroup=v1: success {"writable_mounts": ["/dev", "/dev/mqueue", "/dev/pts", "/proc", "/proc/keys", "/proc/timer_list", "/sys/fs/cgroup", "/tmp"], "host_docker_paths": [], "usr_write": "EROFS", "etc_passwd_write": "EACCES", "tmp_exec_mount": "noexec"}
# expect guards_off when cgroup=v1,runtime=gvisor: success {"etc_passwd_write": "EACCES", "host_docker_paths": [], "tmp_exec_mount": "noexec", "usr_write": "EACCES", "writable_mounts": ["/dev", "/dev/pts", "/proc", "/tmp"]}
# expect ablation when cgroup=v1: success {"writable_mounts": ["/dev", "/dev/mqueue", "/dev/pts", "/proc", "/proc/keys", "/proc/timer_list", "/sys/fs/cgroup", "/tmp"], "host_docker_paths": [], "usr_write": "EROFS", "etc_passwd_write": "EACCES", "tmp_exec_mount": "noexec"}
# expect ablation when cgroup=v1,runtime=gvisor: success {"etc_passwd_write": "EACCES", "host_docker_paths": [], "tmp_exec_mount": "noexec", "usr_write": "EACCES", "writable_mounts": ["/dev", "/dev/pts", "/proc", "/tmp"]}
# layers: rootfs, uid, config
# note: /etc/passwd answers EACCES (root's file) before the read-only root is even asked; the rw mounts are /proc, Docker's masks over it, a tmpfs of root-owned cgroup dirs, /dev and /tmp
import os

with open("/proc/self/mountinfo") as handle:
    lines = handle.read().splitlines()
writable, host = [], []
for line in lines:
    fields = line.split()
    point, options = fields[4], fields[5].split(",")
    if "rw" in options:
        writable.append(point)
    if "docker.sock" in line or "containerd" in line:
        host.append(point)


def err(path):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        return "written"
    except OSError as exc:
        return {13: "EACCES", 30: "EROFS"}.get(exc.errno, exc.errno)


tmp = [line.split()[5] for line in lines if line.split()[4] == "/tmp"][0]
return {
    "writable_mounts": sorted(writable),
    "host_docker_paths": host,
    "usr_write": err("/usr/redteam"),
    "etc_passwd_write": err("/etc/passwd"),
    "tmp_exec_mount": "noexec" if "noexec" in tmp else tmp,
}
