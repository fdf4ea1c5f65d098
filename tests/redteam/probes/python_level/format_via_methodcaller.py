# title: str.format called through operator.methodcaller, past the format-call rewrite, walks to os.environ
# threat: py.runtime-names
# expect default: security_violation@analyze "Import of standard library module 'operator' is disallowed"
# expect guards_off: success {"has_path": true, "secret": false}
# note: with guards off the traversal works and prints the environment: it holds the image's variables only
import operator
import random
import re

template = "{0.Random.seed." + "".join(["__glo", "bals__"]) + "[_os].environ}"
text = operator.methodcaller("format", random)(template)
return {
    "has_path": "PATH" in text,
    "secret": bool(re.search(r"rt(?:canary|token)-[0-9a-f]{32}|N8N_", text)),
}
