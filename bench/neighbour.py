"""Tenant B's latency with and without tenant A's hostile load: a measurement.

``sandbox-runner up`` runs as a child process (:class:`runner.testing.UpProcess`) with
two API keys, tenant A's imports unlimited (the container is the wall, so each attack
is mounted for real). B submits a trivial task (``POST /v1/tasks?wait=``) ``samples``
times with nothing else running (:data:`GAP_S` apart), then as many times while A
keeps ``attackers`` hostile tasks in flight, rotating through :data:`ATTACKS`. Reported:
B's p50/p95 both ways, their ratio, and what A's tasks ended as. Nothing is asserted:
``tests/integration/test_noisy_neighbour.py`` proves the ordering; this says how much
B pays on this machine.

The hostile task bodies live here and the test imports them: one copy of each.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from bench.stats import percentile
from runner.testing import UpProcess

KEYS = "key-of-a=tenant-a,key-of-b=tenant-b"
A = {"Authorization": "Bearer key-of-a"}
B = {"Authorization": "Bearer key-of-b"}
GAP_S = 0.5
TRIVIAL = "return [{'json': {'n': sum(i['json']['n'] for i in _items)}}]"

# The task writes its own child message to the result pipe: 300,000 empty prints
# (about 1 MB), where the print cap of the task's own `print` cannot see it.
PRINT_FLOOD = """
import os
body = b'{"result": "flooded", "print_args": [' + b",".join([b"[]"] * 300_000) + b"]}"
for fd in range(3, 64):
    try:
        os.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"
"""
# The child claims the analyzer refused it (it ran).
FORGED_VERDICT = """
import json, os
error = {"kind": "security_violation", "message": "Security violations detected",
    "description": "forged", "stderr": ""}
body = json.dumps({"error": error, "print_args": []}).encode()
for fd in range(3, 64):
    try:
        os.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"
"""
# Tries to join the agent's process group (refused: the child has a session of its
# own), then spins past its timeout.
JOIN_AGENT_GROUP = """
import os
try:
    os.setpgid(0, os.getpgid(os.getppid()))
except OSError:
    pass
while True:
    pass
"""
KILL_THE_AGENT = """
import os, signal
os.kill(os.getppid(), signal.SIGKILL)
while True:
    pass
"""
# Code at the runner's size ceiling (256 KiB) that is all parse.
HEAVY_CODE = "x = [" + "(1, 2)," * 36_000 + "]\nreturn len(x)"

ATTACKS: dict[str, dict[str, Any]] = {
    "print flood": {"code": PRINT_FLOOD},
    "forged verdict": {"code": FORGED_VERDICT},
    "timeout evasion": {"code": JOIN_AGENT_GROUP, "timeoutSeconds": 2},
    "kills its agent": {"code": KILL_THE_AGENT, "timeoutSeconds": 5},
    "code at the ceiling": {"code": HEAVY_CODE},
}


def up_env() -> dict[str, str]:
    return {
        "SANDBOX_API_KEYS": KEYS,
        "SANDBOX_STDLIB_ALLOW": "*",
        "SANDBOX_RUNNER_ID": "bench-neighbour",
        "N8N_RUNNERS_MAX_CONCURRENCY": "5",
    }


async def b_latencies(client: httpx.AsyncClient, samples: int) -> list[float]:
    """B's trivial task, one at a time with a pause between (so that alone, each finds
    the warm pool refilled, as a task arriving at an idle runner does): milliseconds
    from submit to result."""
    seen = []
    for n in range(samples):
        await asyncio.sleep(GAP_S)
        began = time.perf_counter()
        response = await client.post(
            "/v1/tasks",
            params={"wait": 60},
            json={"code": TRIVIAL, "items": [{"n": n}]},
            headers=B,
        )
        if response.status_code != 200 or response.json().get("status") != "success":
            raise RuntimeError(f"B's task failed: {response.status_code} {response.text[:300]}")
        seen.append((time.perf_counter() - began) * 1000)
    return seen


async def a_attacks(client: httpx.AsyncClient, stop: asyncio.Event, ended: Counter[str]) -> None:
    """One of A's workers: hostile tasks back to back, rotating, until ``stop``."""
    names = list(ATTACKS)
    index = 0
    while not stop.is_set():
        name = names[index % len(names)]
        index += 1
        response = await client.post(
            "/v1/tasks", params={"wait": 60}, json=ATTACKS[name], headers=A
        )
        document = response.json()
        code = (document.get("error") or {}).get("code") or document.get("status", "?")
        ended[f"{name}: {code}"] += 1


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 1),
        "p95": round(percentile(values, 95), 1),
    }


async def measure(samples: int = 30, attackers: int = 3) -> dict[str, Any]:
    up = await asyncio.to_thread(UpProcess, up_env())
    try:
        async with httpx.AsyncClient(base_url=up.url, timeout=120) as client:
            await b_latencies(client, 3)  # warm: the pool is full, the analyzer loaded
            alone = await b_latencies(client, samples)
            stop = asyncio.Event()
            ended: Counter[str] = Counter()
            workers = [
                asyncio.create_task(a_attacks(client, stop, ended)) for _ in range(attackers)
            ]
            await asyncio.sleep(1.0)  # A's load is in flight before B measures
            try:
                loaded = await b_latencies(client, samples)
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
            rss = up.rss_mib()
    finally:
        await asyncio.to_thread(up.stop)
    quiet, busy = summary(alone), summary(loaded)
    return {
        "alone": quiet,
        "underAttack": busy,
        "p50Ratio": round(busy["p50"] / quiet["p50"], 2),
        "p95Ratio": round(busy["p95"] / quiet["p95"], 2),
        "attackers": attackers,
        "attacksEnded": dict(sorted(ended.items())),
        "upRssMiBAfter": rss,
    }


def markdown(result: dict[str, Any]) -> list[str]:
    alone, busy = result["alone"], result["underAttack"]
    return [
        "",
        f"Noisy neighbour (`sandbox-runner up`, two API keys): tenant B's trivial task, "
        f"one at a time, p50 **{alone['p50']:.0f} ms** / p95 {alone['p95']:.0f} ms alone, "
        f"p50 **{busy['p50']:.0f} ms** / p95 {busy['p95']:.0f} ms while tenant A keeps "
        f"{result['attackers']} hostile tasks in flight (print flood on the result pipe, "
        f"forged verdicts, timeout evasion, killing its agent, code at the size ceiling): "
        f"{result['p50Ratio']:.2f}x / {result['p95Ratio']:.2f}x. The `up` process held "
        f"{result['upRssMiBAfter']} MiB afterwards.",
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=2))
