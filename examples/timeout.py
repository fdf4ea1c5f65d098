# An endless loop: the task is killed when its timeout passes.
count = 0
while True:
    count += 1
