# title: str.format_map with {x.__class__.__mro__} in the template
# threat: py.runtime-names
# expect default: security_violation@analyze "String pattern accessing '__class__' is disallowed"
# expect guards_off: security_violation@run "String pattern accessing '__class__' is disallowed"
return "{x.__class__.__mro__}".format_map({"x": 1})
