"""What the agent loads: every task container pays for it again at its start.

The agent is started afresh in every task container, so each module it imports is
CPU spent per task (``python -m bench.agent_start`` measures it in the task image).
These tests pin what was trimmed, by module names, never by time: the agent's start
loads no typing or dataclass machinery.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Imported by nothing the agent needs: only by the annotations and dataclasses it had.
NOT_AT_START = ("typing", "dataclasses", "inspect", "dis", "copy")


def test_the_agent_start_loads_no_typing_or_dataclass_machinery(agent_path: Path) -> None:
    # -S: nothing of site-packages loaded before the agent, so the set is the agent's.
    script = (
        "import sys; before = set(sys.modules); "
        f"sys.path.insert(0, {str(agent_path)!r}); import sandbox_agent.agent; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = set(done.stdout.split())
    assert {"sandbox_agent.analyzer_core", "sandbox_agent.child", "ast", "json"} <= loaded
    assert loaded.isdisjoint(NOT_AT_START), sorted(loaded.intersection(NOT_AT_START))
