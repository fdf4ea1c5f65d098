# title: os.environ of the task, also printed and written to stdout/stderr: no runner secret
# threat: py.secrets
# expect default: security_violation@analyze "Import of standard library module 'os' is disallowed"
# expect guards_off: success {"keys": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "secret": false}
import os

text = repr(dict(os.environ))
print(text)
os.write(1, text.encode())
os.write(2, text.encode())
return {
    "keys": sorted(os.environ),
    "secret": "rtcanary-" in text or "rttoken-" in text or "N8N_" in text,
}
