# title: memory bomb in one allocation of 512 MiB, written to, under a 64 MiB limit
# threat: res.bombs
# limits: {"memory_bytes": 67108864}
# expect default: memory_limit_exceeded@run "Task ran out of memory (limit 64 MiB)"
# expect guards_off: memory_limit_exceeded@run "Task ran out of memory (limit 64 MiB)"
blob = b"x" * (512 * 1024 * 1024)
return len(blob)
