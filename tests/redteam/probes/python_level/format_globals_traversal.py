# title: str.format walks {0.Random.seed.__globals__[_os].environ} and prints the environment
# threat: py.runtime-names
# expect default: security_violation@analyze "String pattern accessing '__globals__' is disallowed"
# expect guards_off: security_violation@run "String pattern accessing '__globals__' is disallowed"
# note: the format guard stays on with every other guard off: it is part of the code wrapper
import random

text = "{0.Random.seed.__globals__[_os].environ}".format(random)
return {"has_path": "PATH" in text, "secret": "SANDBOX_REDTEAM" in text}
