# title: string.Formatter().vformat / get_field with a runtime-built dunder path
# threat: py.runtime-names
# expect default: security_violation@run "String pattern accessing '__globals__' is disallowed"
# expect guards_off: security_violation@run "String pattern accessing '__globals__' is disallowed"
import random
import string

path = "0.Random.seed." + "".join(["__glo", "bals__"]) + "[_os]"
found = string.Formatter().get_field(path, (random,), {})
return {"reached": "posix" in repr(found)}
