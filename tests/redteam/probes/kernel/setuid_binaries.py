# title: setuid-root or file-capability binaries the image ships, run to gain root
# threat: k.over-capable
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"setuid_files": [], "euid_after_exec": 10001}
# expect ablation: success {"setuid_files": [], "euid_after_exec": 10001}
# layers: nnp, config
import os
import subprocess

found = []
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "tmp")]
    for name in names:
        path = os.path.join(root, name)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if mode & 0o6000 and os.path.isfile(path):
            found.append(path)
euid = subprocess.run(
    ["/usr/bin/python3", "-c", "import os; print(os.geteuid())"], capture_output=True, text=True
).stdout
return {"setuid_files": sorted(found), "euid_after_exec": int(euid)}
