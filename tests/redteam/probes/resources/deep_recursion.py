# title: unbounded Python recursion
# threat: res.bombs
# expect default: user_error@run "maximum recursion depth exceeded"
# expect guards_off: user_error@run "maximum recursion depth exceeded"
def down(n):
    return down(n + 1)


return down(0)
