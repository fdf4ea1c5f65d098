# title: host network, pid, ipc or uts namespace? (interfaces, pid 1, hostname, ipc ns)
# threat: k.over-capable
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"interfaces": ["lo"], "pid1": "tini", "hostname": "sandbox", "processes": 3, "dev_shm": false}
# expect guards_off when runtime=gvisor: success {"dev_shm": true, "hostname": "sandbox", "interfaces": ["lo"], "pid1": "tini", "processes": 3}
# expect ablation: success {"interfaces": ["lo"], "pid1": "tini", "hostname": "sandbox", "processes": 3, "dev_shm": false}
# expect ablation when runtime=gvisor: success {"dev_shm": true, "hostname": "sandbox", "interfaces": ["lo"], "pid1": "tini", "processes": 3}
# layers: network, pidns, ipcns, config
import os
import socket

with open("/proc/1/comm") as handle:
    pid1 = handle.read().strip()
return {
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "pid1": pid1,
    "hostname": socket.gethostname(),
    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
    # ipc_mode none: a private IPC namespace without even a /dev/shm
    "dev_shm": os.path.exists("/dev/shm"),
}
