# title: CPU spin in pure Python, every guard passing it
# threat: res.bombs
# limits: {"timeout_s": 2}
# expect default: timeout@run "Task execution timed out after 2 seconds"
# expect guards_off: timeout@run "Task execution timed out after 2 seconds"
n = 0
while True:
    n += 1
