"""``RunnerProtocol``: the runner side of n8n's task-runner protocol, with no I/O.

Frames go in (:meth:`RunnerProtocol.receive_frame`), time goes in (:meth:`tick`,
with an injected clock), task outcomes go in (:meth:`finish_task`); frames to send
(:meth:`frames_to_send`) and events for the service (:meth:`events`) come out. The
caller owns the socket and the timers; this class owns the rules:

- registration (``broker:inforequest`` -> ``runner:info``; ``broker:runnerregistered``
  starts offering);
- offers: ``validFor`` 5000 ms + 0-500 ms jitter, topped up on every tick (the
  caller ticks every 250 ms) to ``max_concurrency - (open offers + tasks)``, honoured
  locally until ``validFor`` + 100 ms;
- acceptance with n8n's two exact rejection reasons, and duplicate task ids refused;
- settings: parsed here, so malformed settings or an unknown ``nodeMode`` become a
  ``runner:taskerror`` (n8n leaves such a task stuck until the broker's timeout);
- cancel: a waiting task is dropped and its slot re-offered; a running one is handed
  to the service to kill, and ends with "Task was cancelled";
- drain: offering stops and open offers are withdrawn;
- completion: print RPCs, then exactly one ``runner:taskdone``/``runner:taskerror`` per
  accepted task; a completion that cannot be delivered now (socket down) is held and
  sent after the next registration, or reported as undeliverable when it expires.
  A broker that lists the ``sandbox-prints`` extension (ours) gets the prints inside
  the completion's report instead: one frame per task, whatever it printed. The
  prints arrive here already capped by the pipeline (entries and bytes);
- acknowledgements (``sandbox-ack``, ours): a broker that lists it gets completions
  asking for one (``"ack": true`` in the report); each stays here, once sent, until its
  ``broker:taskack``, and a connection lost before that holds it again like an unsent
  one: a completion written into a dying socket is sent again after the reconnect
  instead of lost (the broker drops a second copy of one it has, and acks that too).

Must not import asyncio, websockets or docker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from runner.errors import ProtocolError, UnknownMessageType
from runner.protocol.codec import decode_broker_message, encode
from runner.protocol.messages import (
    EXTENSION_ACK,
    EXTENSION_PRINTS,
    EXTENSION_SANDBOX,
    LOG_NODE_OUTPUT,
    Drain,
    InfoRequest,
    Rpc,
    RpcResponse,
    RunnerInfo,
    RunnerRegistered,
    TaskAccepted,
    TaskAck,
    TaskCancel,
    TaskDone,
    TaskDoneData,
    TaskErrorBody,
    TaskErrorMessage,
    TaskOffer,
    TaskOfferAccept,
    TaskRejected,
    TaskSettingsMessage,
)
from runner.protocol.settings import TaskSettings, parse_task_settings

log = logging.getLogger(__name__)

OFFER_VALIDITY_MS = 5000
OFFER_JITTER_MS = 500
OFFER_GRACE_S = 0.1
TICK_INTERVAL_S = 0.25

REJECT_EXPIRED = "Offer expired - not accepted within validity window"
REJECT_CAPACITY = "No open task slots - runner already at capacity"
REJECT_DUPLICATE = "Duplicate task id - a task with this id is already accepted"
CANCELLED_MESSAGE = "Task was cancelled"


class TaskState(StrEnum):
    WAITING_FOR_SETTINGS = "waiting_for_settings"
    RUNNING = "running"
    CANCELLING = "cancelling"


# --- events for the service ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTask:
    task_id: str
    settings: TaskSettings
    # When this runner accepted the task (the machine's clock): the wait for its settings
    # counts as queueing, not as running.
    accepted_at: float | None = None


@dataclass(frozen=True, slots=True)
class CancelTask:
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdleTimeout:
    idle_s: float


@dataclass(frozen=True, slots=True)
class Undeliverable:
    task_id: str
    reason: str


Event = StartTask | CancelTask | IdleTimeout | Undeliverable


@dataclass(frozen=True, slots=True)
class Completion:
    """How a task ended, as the service reports it."""

    result: Any = None
    error_message: str | None = None
    # None: no ``description`` key on the wire (n8n does so for cancel/syntax errors).
    error_description: str | None = None
    prints: list[list[str]] = field(default_factory=list)
    report: dict[str, Any] | None = None  # our extension: code, stage, audit

    @property
    def is_error(self) -> bool:
        return self.error_message is not None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame to send; ``task_id`` set for frames that must not be lost (prints, completion)."""

    frame: str
    task_id: str | None = None


@dataclass
class _Task:
    task_id: str
    state: TaskState
    accepted_at: float


@dataclass
class _Held:
    task_id: str
    frames: list[Outgoing]
    expires_at: float


class RunnerProtocol:
    """The runner side of the protocol. Single-threaded; drive it from one event loop."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        max_payload: int,
        clock: Callable[[], float],
        new_id: Callable[[], str],
        jitter_ms: Callable[[], int],
        auto_shutdown_s: float = 0,
        undelivered_ttl_s: float = 300,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_payload = max_payload
        self._clock = clock
        self._new_id = new_id
        self._jitter_ms = jitter_ms
        self._auto_shutdown_s = auto_shutdown_s
        self._undelivered_ttl_s = undelivered_ttl_s
        self._connected = False
        self._registered = False  # on the current connection
        self._can_offer = False
        self._stopping = False
        self._extensions: frozenset[str] = frozenset()
        self._offers: dict[str, float] = {}  # offer id -> local deadline
        self._tasks: dict[str, _Task] = {}
        self._finished: set[str] = set()
        self._held: list[_Held] = []
        # sandbox-ack: tasks whose completion asks for an ack, and of those, the frames
        # sent on this connection and not acknowledged yet.
        self._ack_wanted: set[str] = set()
        self._unacked: dict[str, list[Outgoing]] = {}
        self._outbox: list[Outgoing] = []
        self._events: list[Event] = []
        self._last_activity = clock()

    # -- state for the caller ---------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def running_count(self) -> int:
        return len(self._tasks)

    @property
    def open_offer_count(self) -> int:
        return len(self._offers)

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def unacked_count(self) -> int:
        return len(self._unacked)

    def task_state(self, task_id: str) -> TaskState | None:
        task = self._tasks.get(task_id)
        return task.state if task else None

    # -- outputs ----------------------------------------------------------------------

    def frames_to_send(self) -> list[Outgoing]:
        frames, self._outbox = self._outbox, []
        return frames

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- connection -------------------------------------------------------------------

    def connection_made(self) -> None:
        self._connected = True
        self._registered = False
        self._can_offer = False  # until broker:runnerregistered

    def connection_lost(self) -> None:
        """Open offers die with the socket; tasks waiting for settings can never get them."""
        self._connected = False
        self._registered = False
        self._can_offer = False
        self._offers.clear()
        for task in list(self._tasks.values()):
            if task.state is TaskState.WAITING_FOR_SETTINGS:
                log.warning(
                    "dropping task %s: connection lost before its settings came", task.task_id
                )
                del self._tasks[task.task_id]
        # Sent but not acknowledged: maybe lost with the socket, so held like the unsent
        # (a frame both sent-pending and unacked is held once).
        unacked = [frame for frames in self._unacked.values() for frame in frames]
        pending = [
            frame
            for frame in self._outbox
            if frame.task_id is not None and frame.task_id not in self._unacked
        ]
        self._unacked.clear()
        self._hold(unacked + pending)
        self._outbox.clear()

    def unsent(self, frames: list[Outgoing]) -> None:
        """The I/O layer could not send these: keep what matters for the next connection."""
        kept = [frame for frame in frames if frame.task_id is not None]
        for frame in kept:
            self._unacked.pop(frame.task_id or "", None)  # held now, not awaiting an ack
        self._hold(kept)

    # -- inputs -----------------------------------------------------------------------

    def receive_frame(self, frame: str | bytes) -> None:
        try:
            message = decode_broker_message(frame)
        except UnknownMessageType as exc:
            log.info("Error handling message: %s", exc)
            return
        except ProtocolError as exc:
            log.warning("Error handling message: %s", exc)
            return
        self.receive(message)

    def receive(self, message: BaseModel) -> None:
        match message:
            case InfoRequest():
                self._send(RunnerInfo())
            case RunnerRegistered(extensions=extensions):
                self._on_registered(frozenset(extensions))
            case TaskOfferAccept(task_id=task_id, offer_id=offer_id):
                self._offer_accepted(task_id, offer_id)
            case TaskSettingsMessage(task_id=task_id, settings=settings):
                self._settings(task_id, settings)
            case TaskCancel(task_id=task_id, reason=reason):
                self._cancel(task_id, reason)
            case TaskAck(task_id=task_id):
                self._unacked.pop(task_id, None)
                self._ack_wanted.discard(task_id)
            case Drain():
                log.info("Received drain signal, stopped accepting new tasks")
                self._can_offer = False
                self._offers.clear()
            case RpcResponse():
                pass  # n8n's runner ignores them too
            case _:
                log.info("Error handling message: unhandled %s", type(message).__name__)

    def tick(self) -> None:
        """Call every :data:`TICK_INTERVAL_S`: expire offers, top up, idle and held timers."""
        now = self._clock()
        self._offers = {oid: deadline for oid, deadline in self._offers.items() if deadline > now}
        self._top_up(now)
        for held in [h for h in self._held if h.expires_at <= now]:
            self._held.remove(held)
            self._ack_wanted.discard(held.task_id)
            self._events.append(Undeliverable(held.task_id, "no broker connection in time"))
        if (
            self._auto_shutdown_s > 0
            and not self._tasks
            and now - self._last_activity >= self._auto_shutdown_s
        ):
            self._events.append(IdleTimeout(now - self._last_activity))
            self._last_activity = now  # one event per idle period

    def finish_task(self, task_id: str, completion: Completion) -> None:
        """The service's report for a task: sends its prints and its one completion."""
        task = self._tasks.pop(task_id, None)
        if task is None:
            if task_id in self._finished:
                log.error("task %s reported twice; the second report is dropped", task_id)
            else:
                log.error("completion for unknown task %s dropped", task_id)
            return
        self._finished.add(task_id)
        self._last_activity = self._clock()
        frames = []
        if not self._prints_in_report:
            frames = [self._encode_rpc(task_id, params) for params in completion.prints]
        frames.append(self._encode_completion(task_id, completion))
        if self._asks_ack(completion):
            self._ack_wanted.add(task_id)
        if self._registered:
            self._outbox.extend(frames)
            if task_id in self._ack_wanted:
                self._unacked[task_id] = frames
        else:
            self._hold(frames)
        self._top_up(self._clock())

    def begin_shutdown(self) -> None:
        """Stop offering and accepting; running tasks continue until the service ends them."""
        self._stopping = True
        self._can_offer = False
        self._offers.clear()

    def undelivered_task_ids(self) -> list[str]:
        return [held.task_id for held in self._held]

    # -- rules ------------------------------------------------------------------------

    def _on_registered(self, extensions: frozenset[str]) -> None:
        self._registered = True
        self._extensions = extensions
        self._last_activity = self._clock()
        if not self._stopping:
            self._can_offer = True
        now = self._clock()
        for held in self._held:
            if held.expires_at <= now:
                # Back too late: the broker has given up on it (as ``tick`` says offline).
                self._ack_wanted.discard(held.task_id)
                self._events.append(Undeliverable(held.task_id, "no broker connection in time"))
                continue
            self._outbox.extend(held.frames)
            if held.task_id in self._ack_wanted:
                self._unacked.setdefault(held.task_id, []).extend(held.frames)
            log.info("delivering the held completion of task %s after reconnecting", held.task_id)
        self._held.clear()
        self._top_up(self._clock())

    def _top_up(self, now: float) -> None:
        if not (self._connected and self._can_offer):
            return
        for _ in range(self.max_concurrency - (len(self._offers) + len(self._tasks))):
            valid_for = OFFER_VALIDITY_MS + self._jitter_ms()
            offer_id = self._new_id()
            self._offers[offer_id] = now + valid_for / 1000 + OFFER_GRACE_S
            self._send(TaskOffer(offer_id=offer_id, valid_for=valid_for))

    def _offer_accepted(self, task_id: str, offer_id: str) -> None:
        now = self._clock()
        deadline = self._offers.get(offer_id)
        if task_id in self._tasks or task_id in self._finished:
            self._send(TaskRejected(task_id=task_id, reason=REJECT_DUPLICATE))
            return
        if deadline is None or deadline <= now or self._stopping:
            self._offers.pop(offer_id, None)
            self._send(TaskRejected(task_id=task_id, reason=REJECT_EXPIRED))
            return
        if len(self._tasks) >= self.max_concurrency:
            self._send(TaskRejected(task_id=task_id, reason=REJECT_CAPACITY))
            return
        del self._offers[offer_id]
        self._tasks[task_id] = _Task(task_id, TaskState.WAITING_FOR_SETTINGS, now)
        self._last_activity = now
        self._send(TaskAccepted(task_id=task_id))
        log.info("Accepted task %s", task_id)

    def _settings(self, task_id: str, raw: Any) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            message = f"Failed to find task {task_id}. This is likely an internal error."
            log.warning(message)
            self._send_error_frame(task_id, message, "")
            return
        if task.state is not TaskState.WAITING_FOR_SETTINGS:
            log.warning("duplicate settings for task %s discarded", task_id)
            return
        try:
            settings = parse_task_settings(raw)
        except ValueError as exc:
            log.warning("invalid settings for task %s: %s", task_id, exc)
            self.finish_task(task_id, Completion(error_message=str(exc), error_description=""))
            return
        task.state = TaskState.RUNNING
        self._events.append(StartTask(task_id, settings, task.accepted_at))
        log.info("Received task %s", task_id)

    def _cancel(self, task_id: str, reason: str) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            log.info("Received cancel for unknown task: %s. Discarding message.", task_id)
            return
        if task.state is TaskState.WAITING_FOR_SETTINGS:
            # It never ran here: the broker may offer it again (after a late accept it
            # cancelled), and taking it then is no duplicate.
            del self._tasks[task_id]
            log.info("Cancelled task %s (waiting for settings)", task_id)
            self._top_up(self._clock())
            return
        if task.state is TaskState.RUNNING:
            task.state = TaskState.CANCELLING
            self._events.append(CancelTask(task_id, reason))

    # -- encoding ---------------------------------------------------------------------

    def _send(self, message: BaseModel) -> None:
        self._outbox.append(Outgoing(encode(message)))

    def _send_error_frame(self, task_id: str, message: str, description: str | None) -> None:
        error = TaskErrorMessage(
            task_id=task_id, error=TaskErrorBody(message=message, description=description)
        )
        self._outbox.append(Outgoing(encode(error), task_id))

    def _encode_rpc(self, task_id: str, params: list[str]) -> Outgoing:
        rpc = Rpc(
            call_id=self._new_id(), task_id=task_id, name=LOG_NODE_OUTPUT, params=tuple(params)
        )
        return Outgoing(encode(rpc), task_id)

    @property
    def _prints_in_report(self) -> bool:
        return {EXTENSION_SANDBOX, EXTENSION_PRINTS} <= self._extensions

    def _asks_ack(self, completion: Completion) -> bool:
        """Whether the completion's frame asks for an ack (it rides in our report)."""
        wanted = {EXTENSION_SANDBOX, EXTENSION_ACK} <= self._extensions
        return wanted and completion.report is not None

    def _encode_completion(self, task_id: str, completion: Completion) -> Outgoing:
        report = completion.report if EXTENSION_SANDBOX in self._extensions else None
        if report is not None and self._prints_in_report:
            report = {**report, "prints": completion.prints}
        if report is not None and self._asks_ack(completion):
            report = {**report, "ack": True}
        if not completion.is_error:
            done = TaskDone(
                task_id=task_id, data=TaskDoneData(result=completion.result), sandbox=report
            )
            try:
                frame = encode(done)
            except ValueError as exc:  # a circular value: never on the wire
                problem = f"Task result cannot be sent as JSON: {exc}"
            else:
                size = len(frame.encode("utf-8"))
                if size <= self.max_payload:
                    return Outgoing(frame, task_id)
                problem = (
                    f"Task result of {size} bytes exceeds the broker's maximum payload of "
                    f"{self.max_payload} bytes (N8N_RUNNERS_MAX_PAYLOAD)"
                )
            completion = Completion(
                error_message=problem, error_description="", report=completion.report
            )
        assert completion.error_message is not None
        message = TaskErrorMessage(
            task_id=task_id,
            error=TaskErrorBody(
                message=completion.error_message, description=completion.error_description
            ),
            sandbox=report,
        )
        return Outgoing(encode(message), task_id)

    def _hold(self, frames: list[Outgoing]) -> None:
        by_task: dict[str, list[Outgoing]] = {}
        for frame in frames:
            assert frame.task_id is not None
            by_task.setdefault(frame.task_id, []).append(frame)
        expires_at = self._clock() + self._undelivered_ttl_s
        for task_id, task_frames in by_task.items():
            log.warning("completion of task %s held until the broker is back", task_id)
            self._held.append(_Held(task_id, task_frames, expires_at))
