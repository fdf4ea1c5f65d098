# title: sys._getframe to the agent's Child object: its task envelope holds no secret
# threat: py.frames
# expect default: security_violation@analyze "Import of standard library module 'sys' is disallowed"
# expect guards_off: success {"envelope_keys": ["code", "guards", "items", "limits", "mode", "query", "taskId", "version"], "token_in_envelope": false, "pipe_is_own": true}
import json
import os
import re
import sys

frame = sys._getframe(0)
child = None
while frame is not None:
    candidate = frame.f_locals.get("self")
    if type(candidate).__name__ == "Child":
        child = candidate
    frame = frame.f_back
envelope = json.dumps(child.task)
return {
    "envelope_keys": sorted(child.task),
    "token_in_envelope": bool(re.search(r"rt(?:canary|token)-[0-9a-f]{32}", envelope)),
    # the only descriptor it holds is its own result pipe: nothing of the runner
    "pipe_is_own": os.fstat(child.write_fd).st_mode & 0o170000 == 0o010000,
}
