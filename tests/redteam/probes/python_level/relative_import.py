# title: a relative import (from . import x)
# threat: py.dynamic-import
# expect default: security_violation@analyze "Relative imports are disallowed."
# expect guards_off: user_error@run "'__name__' not in globals"
from . import agent

return repr(agent)
