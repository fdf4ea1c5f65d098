# title: AF_VSOCK: connect to the hypervisor host (CID 2), which no network namespace isolates
# threat: k.sockets
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"socket": "EPERM"}
# expect ablation when vsock=virtio: success {"socket": "ok", "host_cid2_port1024": "ECONNRESET"}
# expect ablation when vsock=virtio,runtime=gvisor: user_error@run "[Errno 97] Address family not supported by protocol"
# layers when vsock=virtio: none
# ours: refuses
# note: on a VM with the virtio vsock transport (the reference host: Firecracker): under Docker's default profile a task reaches the hypervisor's vsock endpoint (the reset is the host answering: no listener on that port); network none does not cover vsock. Only our profile refuses it
import socket

try:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
except PermissionError:
    return {"socket": "EPERM"}
sock.settimeout(3)
try:
    sock.connect((2, 1024))
    host = "connected"
except OSError as exc:
    host = {104: "ECONNRESET", 110: "ETIMEDOUT", 19: "ENODEV", 111: "ECONNREFUSED"}.get(
        exc.errno, exc.errno
    )
finally:
    sock.close()
return {"socket": "ok", "host_cid2_port1024": host}
