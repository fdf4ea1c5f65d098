# title: gc.get_objects() over the whole heap, looking for modules and secrets
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'gc' is disallowed"
# expect guards_off: success {"found_os": true, "secret_strings": 0}
import gc
import re

pattern = re.compile(r"rt(?:canary|token)-[0-9a-f]{32}")

found_os = False
secrets = 0
for obj in gc.get_objects():
    if type(obj).__name__ == "module" and getattr(obj, "__name__", "") == "os":
        found_os = True
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, str) and pattern.search(value):
                secrets += 1
return {"found_os": found_os, "secret_strings": secrets}
