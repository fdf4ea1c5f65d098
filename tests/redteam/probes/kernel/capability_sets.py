# title: every capability set of the task, and of PID 1 and the agent
# threat: k.over-capable
# expect default: user_error@run "name 'open' is not defined"
# expect guards_off: success {"self": {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0, "NoNewPrivs": 1, "Seccomp": 2}, "pid1": {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0, "NoNewPrivs": 1, "Seccomp": 2}}
# expect guards_off when runtime=gvisor: success {"pid1": {"CapBnd": 0, "CapEff": 0, "CapInh": 0, "CapPrm": 0, "Seccomp": 2}, "self": {"CapBnd": 0, "CapEff": 0, "CapInh": 0, "CapPrm": 0, "Seccomp": 2}}
# expect ablation: success {"self": {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0, "NoNewPrivs": 1, "Seccomp": 2}, "pid1": {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0, "NoNewPrivs": 1, "Seccomp": 2}}
# expect ablation when runtime=gvisor: success {"pid1": {"CapBnd": 0, "CapEff": 0, "CapInh": 0, "CapPrm": 0, "Seccomp": 2}, "self": {"CapBnd": 0, "CapEff": 0, "CapInh": 0, "CapPrm": 0, "Seccomp": 2}}
# layers: caps, nnp


def status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                values[key] = int(value.strip(), 16)
            elif key in ("NoNewPrivs", "Seccomp"):
                values[key] = int(value.strip())
    return values


return {"self": status("self"), "pid1": status(1)}
