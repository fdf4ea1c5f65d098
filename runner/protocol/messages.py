"""Wire messages of n8n's task-runner protocol, as frozen pydantic models.

Each model's ``type`` ``Literal`` is the only copy of its wire string. Keys are
camelCase on the wire (``alias_generator``); fields are snake_case here.

Two directions: :data:`BrokerMessage` (broker -> runner) and :data:`RunnerMessage`
(runner -> broker). The runner decodes the first and encodes the second; our
embedded broker does the reverse with the same models.

Extensions beyond n8n are opt-in and invisible to a stock n8n broker: our broker
lists ``extensions`` in ``broker:runnerregistered``; only then does the runner add a
``sandbox`` object (error code, stage, audit record) to its completion messages.

Must not import asyncio, websockets or docker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

EXTENSION_SANDBOX = "sandbox-report"
# Prints travel in the completion's ``sandbox`` report (``sandbox.prints``), one frame
# per task, instead of one ``runner:rpc`` frame per print call (n8n's way, kept for
# brokers that do not list this extension).
EXTENSION_PRINTS = "sandbox-prints"
# Results acknowledged: a completion whose ``sandbox`` report says ``"ack": true`` gets a
# ``broker:taskack`` once the broker has it; until then the runner keeps it and sends it
# again after a reconnect (a frame written into a dying socket is otherwise lost: n8n's
# protocol has no acknowledgement). Both sides ours; n8n's broker never sees either.
EXTENSION_ACK = "sandbox-ack"
LOG_NODE_OUTPUT = "logNodeOutput"


def _is_none(value: object) -> bool:
    return value is None


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


# --- broker -> runner ------------------------------------------------------------


class InfoRequest(WireModel):
    type: Literal["broker:inforequest"] = "broker:inforequest"


class RunnerRegistered(WireModel):
    type: Literal["broker:runnerregistered"] = "broker:runnerregistered"
    extensions: tuple[str, ...] = ()


class TaskOfferAccept(WireModel):
    type: Literal["broker:taskofferaccept"] = "broker:taskofferaccept"
    task_id: str
    offer_id: str


class TaskSettingsMessage(WireModel):
    """``settings`` stays raw here: bad settings must become a task error, not a protocol error."""

    type: Literal["broker:tasksettings"] = "broker:tasksettings"
    task_id: str
    settings: Any


class TaskCancel(WireModel):
    type: Literal["broker:taskcancel"] = "broker:taskcancel"
    task_id: str
    reason: str


class RpcResponse(WireModel):
    type: Literal["broker:rpcresponse"] = "broker:rpcresponse"
    call_id: str
    task_id: str
    status: str
    data: Any = None


class Drain(WireModel):
    type: Literal["broker:drain"] = "broker:drain"


class TaskAck(WireModel):
    """Ours (:data:`EXTENSION_ACK`): the broker has the completion of ``task_id`` (the id
    as the runner sent it)."""

    type: Literal["broker:taskack"] = "broker:taskack"
    task_id: str


BrokerMessage = Annotated[
    InfoRequest
    | RunnerRegistered
    | TaskOfferAccept
    | TaskSettingsMessage
    | TaskCancel
    | RpcResponse
    | Drain
    | TaskAck,
    Field(discriminator="type"),
]


# --- runner -> broker ------------------------------------------------------------


class RunnerInfo(WireModel):
    type: Literal["runner:info"] = "runner:info"
    name: str = "Python Task Runner"
    types: tuple[str, ...] = ("python",)


class TaskOffer(WireModel):
    type: Literal["runner:taskoffer"] = "runner:taskoffer"
    offer_id: str
    task_type: str = "python"
    valid_for: int


class TaskAccepted(WireModel):
    type: Literal["runner:taskaccepted"] = "runner:taskaccepted"
    task_id: str


class TaskRejected(WireModel):
    type: Literal["runner:taskrejected"] = "runner:taskrejected"
    task_id: str
    reason: str


class TaskDeferred(WireModel):
    """Sent by n8n's launcher; our broker re-queues the task."""

    type: Literal["runner:taskdeferred"] = "runner:taskdeferred"
    task_id: str


class TaskDoneData(WireModel):
    result: Any = None


class TaskDone(WireModel):
    type: Literal["runner:taskdone"] = "runner:taskdone"
    task_id: str
    data: TaskDoneData
    sandbox: dict[str, Any] | None = Field(None, exclude_if=_is_none)


class TaskErrorBody(WireModel):
    """n8n sends no ``description`` key for a cancel or a syntax error."""

    model_config = ConfigDict(frozen=True, extra="allow")
    message: str
    description: str | None = Field(None, exclude_if=_is_none)


class TaskErrorMessage(WireModel):
    type: Literal["runner:taskerror"] = "runner:taskerror"
    task_id: str
    error: TaskErrorBody
    sandbox: dict[str, Any] | None = Field(None, exclude_if=_is_none)


class Rpc(WireModel):
    type: Literal["runner:rpc"] = "runner:rpc"
    call_id: str
    task_id: str
    name: str
    params: tuple[Any, ...] = ()


RunnerMessage = Annotated[
    RunnerInfo
    | TaskOffer
    | TaskAccepted
    | TaskRejected
    | TaskDeferred
    | TaskDone
    | TaskErrorMessage
    | Rpc,
    Field(discriminator="type"),
]


def _wire_types(*models: type[WireModel]) -> frozenset[str]:
    return frozenset(str(model.model_fields["type"].default) for model in models)


BROKER_MESSAGE_TYPES = _wire_types(
    InfoRequest,
    RunnerRegistered,
    TaskOfferAccept,
    TaskSettingsMessage,
    TaskCancel,
    RpcResponse,
    Drain,
    TaskAck,
)
RUNNER_MESSAGE_TYPES = _wire_types(
    RunnerInfo,
    TaskOffer,
    TaskAccepted,
    TaskRejected,
    TaskDeferred,
    TaskDone,
    TaskErrorMessage,
    Rpc,
)

OutboundRunner = (
    RunnerInfo | TaskOffer | TaskAccepted | TaskRejected | TaskDone | TaskErrorMessage | Rpc
)
OutboundBroker = (
    InfoRequest
    | RunnerRegistered
    | TaskOfferAccept
    | TaskSettingsMessage
    | TaskCancel
    | RpcResponse
    | Drain
    | TaskAck
)
