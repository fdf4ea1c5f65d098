# title: inspect.stack() to the agent's frames and locals
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'inspect' is disallowed"
# expect guards_off: success {"frames_above_task": true, "secret_in_locals": false}
import inspect
import re

pattern = re.compile(r"rt(?:canary|token)-[0-9a-f]{32}")

stack = inspect.stack()
texts = [repr(record.frame.f_locals) for record in stack]
return {
    "frames_above_task": len(stack) > 2,
    "secret_in_locals": any(pattern.search(t) for t in texts),
}
