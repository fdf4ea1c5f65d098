# title: every readable file of the image (bounded), searched for the runner's secrets
# threat: py.secrets
# limits: {"timeout_s": 90}
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"matches": [], "scanned_enough": true, "bounded": true}
import os
import re

pattern = re.compile(rb"rt(?:canary|token)-[0-9a-f]{32}|N8N_RUNNERS_(?:AUTH|GRANT)_TOKEN=")
matches, files, total = [], 0, 0
budget = 400 * 1024 * 1024
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in names:
        path = os.path.join(root, name)
        try:
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                data = handle.read(4 * 1024 * 1024)
        except OSError:
            continue
        files += 1
        total += len(data)
        matches += [f"{path}: {m.decode()}" for m in pattern.findall(data)]
        if total > budget:
            break
return {
    "matches": matches,
    "scanned_enough": files > 1000,
    "bounded": total <= budget + 4 * 1024 * 1024,
}
