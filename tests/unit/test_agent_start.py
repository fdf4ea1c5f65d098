"""What the agent loads: every task container pays for it again at its start.

The agent is started afresh in every task container, so each module it imports is
CPU spent per task (``python -m bench.agent_start`` measures it in the task image).
These tests pin what was trimmed, by module names, never by time: the agent's start
loads no typing or dataclass machinery and no ``ctypes`` (yet still makes itself
undumpable), and a user error in the child loads nothing a
second time (the child purges ``sys.modules`` before task code runs; a module the
traceback then needs would be imported afresh, with everything beneath it: ``ast``,
for the carets under the user's line, with contextlib, collections and enum).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from runner.analyzer import DEFAULT_BUILTINS_DENY
from runner.sandbox.base import GuardConfig, Limits, Mode, TaskSpec
from runner.sandbox.envelope import HEADER, encode_task

# Imported by nothing the agent needs: by the annotations and dataclasses it had, and
# ctypes for one prctl call (made with _ctypes now).
NOT_AT_START = ("typing", "dataclasses", "inspect", "dis", "copy", "ctypes")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", re.M)


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


def test_the_agent_makes_itself_undumpable_without_ctypes(agent_path: Path) -> None:
    script = (
        f"import sys; sys.path.insert(0, {str(agent_path)!r}); "
        "from sandbox_agent.agent import make_undumpable; "
        "made = make_undumpable(); loaded = 'ctypes' in sys.modules; "
        # Read back by the kernel's own word, PR_GET_DUMPABLE (3).
        "import ctypes; print(made, loaded, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["True", "False", "0"]


def test_a_user_error_loads_nothing_a_second_time(agent_path: Path) -> None:
    # Carets under the failing expression: the traceback places them with ast.
    code = "values = _items[0]['json']['values']\ntotal = 1 + values[5]\nreturn total"
    spec = TaskSpec(
        task_id="start",
        code=code,
        mode=Mode.ALL_ITEMS,
        items=[{"json": {"values": [1, 2]}}],
        guards=GuardConfig(stdlib_allow=(), external_allow=(), builtins_deny=DEFAULT_BUILTINS_DENY),
    )
    done = subprocess.run(
        [sys.executable, "-I", "-B", "-X", "importtime", str(agent_path / "run.py")],
        input=encode_task(spec, Limits(timeout_s=30)),
        capture_output=True,
        timeout=60,
        check=True,
    )
    (length,) = HEADER.unpack_from(done.stdout)
    body = done.stdout[HEADER.size : HEADER.size + length].split(b"\n", 1)[0]
    error = json.loads(body)["error"]
    assert (error["kind"], error["message"]) == ("user_error", "list index out of range")
    assert error["description"] == (
        "Traceback (most recent call last):\n"
        '  File "<all_items_task_execution>", line 4, in <module>\n'
        '  File "<all_items_task_execution>", line 2, in _user_function\n'
        "    total = 1 + values[5]\n"
        "                ~~~~~~^^^\n"
        "IndexError: list index out of range"
    )
    # The agent's imports (its tree ends with the agent module), then the child's on
    # the same stderr: the child loads nothing the agent had loaded.
    agent_part, _, child_part = done.stderr.decode().partition("| sandbox_agent.agent\n")
    at_start = set(IMPORT_LINE.findall(agent_part))
    assert "sandbox_agent.child" in at_start
    assert sorted(at_start.intersection(IMPORT_LINE.findall(child_part))) == []


def test_a_child_whose_own_code_raises_exits_and_never_runs_the_agents_code(
    agent_path: Path,
) -> None:
    """The forked child is a copy of the agent: if its code raised before sending (a
    MemoryError while it formats a traceback, say), the exception must not unwind into
    the agent's frames in that process (which would go on as if it were the agent)."""
    script = (
        f"import os, sys; sys.path.insert(0, {str(agent_path)!r}); "
        "import sandbox_agent.agent as agent\n"
        "class Raising:\n"
        "    def __init__(self, task, fd): pass\n"
        "    def run(self): raise MemoryError('formatting the traceback')\n"
        "agent.Child = Raising\n"
        "me = os.getpid()\n"
        "try:\n"
        "    agent.main([])\n"
        "finally:\n"
        "    if os.getpid() != me: os.write(2, b'the child unwound into the agent\\n')\n"
    )
    spec = TaskSpec(
        task_id="child-fault",
        code="return []",
        mode=Mode.ALL_ITEMS,
        items=[],
        guards=GuardConfig(stdlib_allow=(), external_allow=(), builtins_deny=DEFAULT_BUILTINS_DENY),
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", script],
        input=encode_task(spec, Limits(timeout_s=30)),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"the child unwound into the agent" not in done.stderr, done.stderr.decode()
    (length,) = HEADER.unpack_from(done.stdout)
    assert len(done.stdout) == HEADER.size + length, "one result frame, from the agent only"
    envelope = json.loads(done.stdout[HEADER.size :].split(b"\n", 1)[0])
    assert envelope["status"] == "error", envelope
    assert envelope["error"]["source"] == "exit", envelope
    assert envelope["stats"]["childExitCode"] == 70, envelope
