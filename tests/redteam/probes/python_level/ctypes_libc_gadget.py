# title: ctypes straight into libc: getenv of the runner's secret, setuid(0), chroot
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'ctypes' is disallowed"
# expect guards_off: success {"getenv": null, "setuid0": [-1, 1], "chroot": [-1, 1]}
import ctypes

libc = ctypes.CDLL(None, use_errno=True)
libc.getenv.restype = ctypes.c_char_p


def call(fn, *args):
    ctypes.set_errno(0)
    return [fn(*args), ctypes.get_errno()]


return {
    "getenv": libc.getenv(b"SANDBOX_REDTEAM_CANARY"),
    "setuid0": call(libc.setuid, 0),
    "chroot": call(libc.chroot, b"/tmp"),
}
