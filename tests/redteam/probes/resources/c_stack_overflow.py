# title: C-stack overflow: recursion limit lifted, recursion through C (map) until the stack runs out
# threat: res.bombs
# limits: {"timeout_s": 20}
# expect default: security_violation@analyze "Import of standard library module 'sys' is disallowed"
# expect guards_off: crashed@run "Task process crashed with signal SIGSEGV"
import sys

sys.setrecursionlimit(10**8)


def down(n):
    return list(map(down, [n + 1]))


down(0)
