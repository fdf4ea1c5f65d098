# title: CPU spin with SIGTERM ignored
# threat: res.bombs
# limits: {"timeout_s": 2}
# expect default: security_violation@analyze "Import of standard library module 'signal' is disallowed"
# expect guards_off: timeout@run "Task execution timed out after 2 seconds"
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    pass
