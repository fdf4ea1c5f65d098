# title: memory bomb: 8 MiB bytearrays until the cgroup says no
# threat: res.bombs
# limits: {"memory_bytes": 67108864}
# expect default: memory_limit_exceeded@run "Task ran out of memory (limit 64 MiB)"
# expect guards_off: memory_limit_exceeded@run "Task ran out of memory (limit 64 MiB)"
hog = []
while True:
    hog.append(bytearray(8 * 1024 * 1024))
