# title: a result nested 100000 lists deep, to crash the JSON encoder of agent or runner
# threat: res.bombs
# expect default: user_error@run "Task result cannot be converted to JSON"
# expect guards_off: user_error@run "Task result cannot be converted to JSON"
deep = []
for _ in range(100000):
    deep = [deep]
return deep
