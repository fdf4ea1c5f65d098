# title: print() flood past the output cap
# threat: res.disk-output
# limits: {"output_bytes": 1048576, "timeout_s": 30}
# expect default: output_limit_exceeded@run "output limit of 1048576 bytes"
# expect guards_off: output_limit_exceeded@run "output limit of 1048576 bytes"
while True:
    print("x" * 10000)
