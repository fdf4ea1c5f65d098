# title: a busy task cancelled from outside after one second (the broker's cancel)
# threat: res.lifecycle
# action: cancel-after 1.5
# limits: {"timeout_s": 30}
# expect default: cancelled@run "Task was cancelled"
# expect guards_off: cancelled@run "Task was cancelled"
n = 0
while True:
    n += 1
