# title: thread bomb: sleeping threads until the pids cgroup stops them
# threat: res.bombs
# limits: {"pids": 32, "timeout_s": 20}
# expect default: security_violation@analyze "Import of standard library module 'threading' is disallowed"
# expect guards_off: pids_limit_exceeded@run "Task hit the process limit (32 processes and threads)"
# expect guards_off when runtime=gvisor: user_error@run "can't start new thread"
import threading
import time

threads = []
while True:
    thread = threading.Thread(target=time.sleep, args=(30,))
    thread.start()
    threads.append(thread)
