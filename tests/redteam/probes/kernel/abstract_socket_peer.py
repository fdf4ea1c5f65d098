# title: connect to another task's abstract unix socket (the listener binds @redteam-listener)
# threat: k.cross-task
# expect default: security_violation@analyze "Import of standard library module 'socket' is disallowed"
# expect guards_off: success {"listener": "ECONNREFUSED", "own_bind": "ok"}
# expect ablation: success {"listener": "ECONNREFUSED", "own_bind": "ok"}
# layers: network
# ours: allows
# note: abstract unix sockets live in the network namespace: one per container with network none
import socket

client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect("\0redteam-listener")
    listener = "connected"
except OSError as exc:
    listener = {111: "ECONNREFUSED", 2: "ENOENT"}.get(exc.errno, exc.errno)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\0redteam-listener")
return {"listener": listener, "own_bind": "ok"}
