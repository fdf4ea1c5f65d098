# title: a 20 MB result on the result channel under a 1 MiB cap
# threat: res.disk-output
# limits: {"output_bytes": 1048576}
# expect default: output_limit_exceeded@run "exceeds the output limit of 1048576 bytes"
# expect guards_off: output_limit_exceeded@run "exceeds the output limit of 1048576 bytes"
return "r" * (20 * 1024 * 1024)
