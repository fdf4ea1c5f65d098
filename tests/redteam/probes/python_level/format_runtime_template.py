# title: a format template assembled at run time, so only the runtime guard can see it
# threat: py.runtime-names
# expect default: security_violation@run "String pattern accessing '__globals__' is disallowed"
# expect guards_off: security_violation@run "String pattern accessing '__globals__' is disallowed"
import random

field = "".join(["{0.Random.seed.", "_", "_glob", "als_", "_[_os].environ}"])
text = field.format(random)
return {"secret": "SANDBOX_REDTEAM" in text}
