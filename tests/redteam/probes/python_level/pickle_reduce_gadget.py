# title: pickle.loads of a crafted stream calls posix.open to write the image
# threat: py.dynamic-import
# expect default: security_violation@analyze "Import of standard library module 'pickle' is disallowed"
# expect guards_off: user_error@run "[Errno 30] Read-only file system: '/etc/redteam'"
# expect guards_off when runtime=gvisor: user_error@run "[Errno 13] Permission denied: '/etc/redteam'"
import pickle

return pickle.loads(b"cposix\nopen\n(S'/etc/redteam'\nI65\ntR.")
