# title: /proc/self/environ: the environment the process started with
# threat: py.secrets
# expect default: user_error@run "name 'open' is not defined"
# expect guards_off: user_error@run "[Errno 13] Permission denied: '/proc/self/environ'"
# expect guards_off when runtime=gvisor: success {"keys": ["HOME", "HOSTNAME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"], "secret": false}
# note: the task is forked from the undumpable agent: its own /proc entries belong to root
with open("/proc/self/environ", "rb") as handle:
    raw = handle.read().decode("latin-1")
keys = sorted(entry.split("=", 1)[0] for entry in raw.split("\0") if entry)
return {"keys": keys, "secret": "rtcanary-" in raw or "rttoken-" in raw or "N8N_" in raw}
