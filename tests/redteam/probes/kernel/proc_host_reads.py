# title: /proc and /sys reads that leak host data: kcore, keys, timer_list, kallsyms, firmware
# threat: k.proc-sys
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off when kcore=no: success {"/proc/kcore": "ENOENT", "/proc/keys": 0, "/proc/timer_list": 0, "/proc/sched_debug": "ENOENT", "/proc/kallsyms_nonzero": false, "/sys/firmware": [], "/proc/acpi": [], "/sys/kernel/debug": []}
# expect guards_off when kcore=no,runtime=gvisor: user_error@run "[Errno 2] No such file or directory: '/proc/kallsyms'"
# expect guards_off when kcore=yes: success {"/proc/kcore": 0, "/proc/keys": 0, "/proc/timer_list": 0, "/proc/sched_debug": "ENOENT", "/proc/kallsyms_nonzero": false, "/sys/firmware": [], "/proc/acpi": [], "/sys/kernel/debug": []}
# expect ablation when kcore=no: success {"/proc/kcore": "ENOENT", "/proc/keys": 0, "/proc/timer_list": 0, "/proc/sched_debug": "ENOENT", "/proc/kallsyms_nonzero": false, "/sys/firmware": [], "/proc/acpi": [], "/sys/kernel/debug": []}
# expect ablation when kcore=no,runtime=gvisor: user_error@run "[Errno 2] No such file or directory: '/proc/kallsyms'"
# expect ablation when kcore=yes: success {"/proc/kcore": 0, "/proc/keys": 0, "/proc/timer_list": 0, "/proc/sched_debug": "ENOENT", "/proc/kallsyms_nonzero": false, "/sys/firmware": [], "/proc/acpi": [], "/sys/kernel/debug": []}
# layers when kcore=no: masked, uid, kernel
# layers when kcore=yes: masked, uid
# note: /proc/keys and /proc/timer_list read empty (Docker masks them with /dev/null); /proc/kcore is keyed on the host: the reference kernel has none (ENOENT); where the host has one, Docker masks it with /dev/null and it reads empty (derived, not yet observed)
import os


def size(path):
    try:
        with open(path, "rb") as handle:
            return len(handle.read(1 << 20))
    except OSError as exc:
        return {2: "ENOENT", 13: "EACCES", 1: "EPERM"}.get(exc.errno, exc.errno)


def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return {2: "ENOENT", 13: "EACCES", 1: "EPERM"}.get(exc.errno, exc.errno)


with open("/proc/kallsyms") as handle:
    nonzero = any(not line.startswith("0000000000000000") for line in handle)
return {
    "/proc/kcore": size("/proc/kcore"),
    "/proc/keys": size("/proc/keys"),
    "/proc/timer_list": size("/proc/timer_list"),
    "/proc/sched_debug": size("/proc/sched_debug"),
    "/proc/kallsyms_nonzero": nonzero,
    "/sys/firmware": listing("/sys/firmware"),
    "/proc/acpi": listing("/proc/acpi"),
    "/sys/kernel/debug": listing("/sys/kernel/debug"),
}
