"""The task child: forked by the agent, runs the user's code, sends one message.

The child is where untrusted code runs, so it is set up to have as little as
possible: a session of its own (so it cannot join the agent's process group), no stdin, fd 1
pointing at the container's stderr (never at the result channel, so nothing the
code writes can be taken for a result), no other inherited descriptors but its end
of the result pipe, an empty environment, purged ``sys.modules``, guarded imports
and filtered builtins. All of that is a speed bump: the container around it is
the wall.

Result shaping follows n8n exactly (reference 5.3); the message on the pipe is
n8n's child message (reference 8), with an added ``kind`` in ``error``.

Everything this process says is the task's claim (task code can write its own
frame to the pipe): the agent marks it so. A limit this process detects itself
(the print bytes, a result too large) is therefore never *claimed*: the child
sends its message and then pushes the pipe past the output cap, so that the agent
measures the overflow and the verdict is the agent's.
"""

from __future__ import annotations

import faulthandler
import io
import os
import sys
import traceback

from . import guards
from .analyzer_core import ALL_ITEMS_FILENAME, PER_ITEM_FILENAME, ImportPolicy, wrap_user_code
from .protocol import HEADER, dumps, encode_frame, write_all

# Names for the type checker only (``typing`` costs the agent's start ~2 ms of CPU;
# these annotations are never evaluated). mypy reads any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

EXIT_SENT = 0
EXIT_SEND_FAILED = 71
# The child's own code raised past everything that sends (a MemoryError while it
# formats the task's traceback, say): it exits, it never returns into the agent.
EXIT_CHILD_FAULT = 70

# Kinds of child errors (the runner maps them to its outcomes).
USER_ERROR = "user_error"
SECURITY_VIOLATION = "security_violation"
PROCESS_EXIT = "process_exit"
OUTPUT_LIMIT = "output_limit_exceeded"
PIDS_LIMIT = "pids_limit_exceeded"
SYNTAX_ERROR = "syntax_error"

RESULT_NAME = "__sandbox_result__"
_MAX_FD = 65536


def shape_item(returned: Any, index: int) -> dict[str, Any] | None:
    """Per-item result shaping, exactly as n8n's runner does it."""
    if returned is None:
        return None  # None drops the item: this is how per-item filtering works
    if isinstance(returned, dict):
        if "json" in returned:
            json_value = returned["json"]
        elif "binary" in returned:
            json_value = {key: value for key, value in returned.items() if key != "binary"}
        else:
            json_value = returned
    else:
        json_value = returned  # n8n passes non-dicts through; the node side rejects them
    shaped: dict[str, Any] = {"json": json_value, "pairedItem": {"item": index}}
    if isinstance(returned, dict) and "binary" in returned:
        shaped["binary"] = returned["binary"]
    return shaped


def user_traceback(exc: BaseException) -> str:
    """The traceback with user frames only: no agent or guard internals."""
    filenames = {ALL_ITEMS_FILENAME, PER_ITEM_FILENAME}
    frames = [
        frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename in filenames
    ]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines.extend(traceback.format_list(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines).rstrip("\n")


class Child:
    """Everything the child needs, prepared by the agent before it forks."""

    def __init__(self, task: dict[str, Any], write_fd: int) -> None:
        self.task = task
        self.write_fd = write_fd
        guards_cfg = task["guards"]
        self.policy = ImportPolicy(
            frozenset(guards_cfg["stdlibAllow"]), frozenset(guards_cfg["externalAllow"])
        )
        self.output_bytes: int = task["limits"]["outputBytes"]
        self.capture = guards.PrintCapture(
            max_calls=task["limits"]["maxPrintCalls"],
            max_bytes=self.output_bytes,
            on_overflow=self._print_overflow,
        )
        self.stderr = io.StringIO()
        self.pid = os.getpid()

    # -- sending ------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> NoReturn:
        if os.getpid() != self.pid:
            # A process the task forked: only the child itself may answer.
            os._exit(EXIT_SENT)
        try:
            body = dumps(message)
            if len(body) > self.output_bytes:
                self._overflow(
                    self._error_message(
                        OUTPUT_LIMIT,
                        f"Task result of {len(body)} bytes exceeds the output limit of "
                        f"{self.output_bytes} bytes",
                    )
                )
            write_all(self.write_fd, encode_frame(body))
        except BaseException:
            os._exit(EXIT_SEND_FAILED)
        os._exit(EXIT_SENT)

    def _overflow(self, message: dict[str, Any]) -> NoReturn:
        """Send ``message`` (why, and the prints so far), then write past the output cap.

        The agent counts the bytes on the pipe: past the cap the verdict is its own
        measurement, not this process's word, and the message that came first lends
        it its text and prints. The filler costs at most the cap, once.
        """
        if os.getpid() != self.pid:
            os._exit(EXIT_SENT)
        try:
            frame = encode_frame(dumps(message))
            write_all(self.write_fd, frame)
            remaining = HEADER.size + self.output_bytes + 1 - len(frame)
            filler = bytes(min(max(remaining, 0), 1 << 16))
            while remaining > 0:
                write_all(self.write_fd, filler[:remaining])
                remaining -= len(filler)
        except BaseException:
            os._exit(EXIT_SEND_FAILED)
        os._exit(EXIT_SENT)

    def _error_message(self, kind: str, message: str, description: str = "") -> dict[str, Any]:
        return {
            "error": {
                "kind": kind,
                "message": message,
                "description": description,
                "stderr": self.stderr.getvalue()[-65536:],
            },
            "print_args": self.capture.entries(),
        }

    def _print_overflow(self, total_bytes: int) -> None:
        # Uncatchable by design: user code cannot swallow the limit and keep printing.
        self._overflow(
            self._error_message(
                OUTPUT_LIMIT,
                f"Task printed more than the output limit of {self.output_bytes} bytes",
                f"{total_bytes} bytes printed",
            )
        )

    # -- running ------------------------------------------------------------------

    def isolate_process(self) -> None:
        # A session of its own: a process group may only be joined from the same
        # session, so no process of the task can move into the agent's group.
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(2, 1)  # the container's stderr, a capped log stream; never the result channel
        os.close(devnull)
        # Only the result pipe survives: no inherited descriptor reaches user code.
        os.closerange(3, self.write_fd)
        os.closerange(self.write_fd + 1, _MAX_FD)
        if self.task["guards"]["blockEnvAccess"]:
            os.environ.clear()
        # A crash in C code (deep recursion, ctypes) dumps the Python stack to the
        # container's stderr; the runner keeps the user's frames of it.
        faulthandler.enable(file=2, all_threads=False)
        sys.stderr = self.stderr  # n8n keeps stderr as a diagnostic, so do we

    def run(self) -> NoReturn:
        try:
            self.isolate_process()
            import_guard = guards.harden_process(self.policy)
            builtins = guards.build_builtins(self.task["guards"]["builtinsDeny"], import_guard)
            safe_format = guards.SafeFormat()
            per_item = self.task["mode"] == "per_item"
            filename = PER_ITEM_FILENAME if per_item else ALL_ITEMS_FILENAME
            try:
                code = wrap_user_code(self.task["code"], filename)
            except SyntaxError as exc:
                # Valid to ast.parse but not as a function body (e.g. a __future__ import).
                self._send(self._error_message(SYNTAX_ERROR, str(exc)))

            def run_once(**names: Any) -> Any:
                scope = guards.make_globals(
                    builtins=builtins, print_fn=self.capture, safe_format=safe_format, **names
                )
                exec(code, scope)
                return scope[RESULT_NAME]

            if per_item:
                result: Any = []
                for index, item in enumerate(self.task["items"]):
                    # a fresh namespace for every item, as n8n does
                    shaped = shape_item(run_once(_item=item), index)
                    if shaped is not None:
                        result.append(shaped)
            else:
                result = run_once(_items=self.task["items"], _query=self.task.get("query"))
        except guards.OutputLimitExceeded as exc:
            self._overflow(self._error_message(OUTPUT_LIMIT, str(exc)))
        except BaseException as exc:
            self._send(self._exception_message(exc))
        self._send_result(result)

    def _send_result(self, result: Any) -> NoReturn:
        message = {"result": result, "print_args": self.capture.entries()}
        try:
            dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            self._send(
                self._error_message(USER_ERROR, f"Task result cannot be converted to JSON: {exc}")
            )
        self._send(message)

    def _exception_message(self, exc: BaseException) -> dict[str, Any]:
        if isinstance(exc, guards.SecurityViolation):
            return self._error_message(SECURITY_VIOLATION, exc.message, exc.description)
        if isinstance(exc, SystemExit):
            code = 0 if exc.code is None else exc.code
            return self._error_message(PROCESS_EXIT, f"Process exited with code {code}")
        message = str(exc) or type(exc).__name__
        description = getattr(exc, "description", None)
        if not isinstance(description, str):
            description = user_traceback(exc)
        return self._error_message(USER_ERROR, message, description)
