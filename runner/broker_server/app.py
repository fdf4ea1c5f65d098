"""The embedded broker's web layer: runner endpoints and the HTTP API on one port.

Runner side (n8n's broker, reference 2 and 3): ``POST /runners/auth`` (auth token ->
single-use grant token in n8n's ``{"data": {"token"}}`` envelope), ``GET /healthz``,
and the WebSocket ``/runners/_ws?id=<runner id>`` with its upgrade checks (400 no id,
401 no Bearer, 403 bad grant).

API side (``/v1/tasks``): submit (at most once per ``Idempotency-Key`` and tenant:
a retry gets the first request's task, another request with the key a 422), wait
for, read, list and cancel tasks as JSON, documented by the OpenAPI schema FastAPI
serves at ``/docs`` and ``/openapi.json``.
Callers authenticate with bearer API keys, each mapped to a tenant; with no keys
configured the API serves loopback clients only, as tenant ``default``. A tenant
sees only its own tasks (anyone else's id is a 404). ``/v1/health`` and ``/metrics``
follow the same rule (they show runner ids and every tenant's load); ``/healthz``
stays open for liveness probes. Request bodies are capped (413, which the client
gets to read: see :class:`~runner.broker_server.edge.BodyLimit`).

The broker's rules are the sans-I/O core's (:mod:`runner.broker_server.core`); the app
reaches it through its :class:`~runner.broker_server.driver.BrokerDriver`, which times
it, wakes the long-polls when a task ends or the drain starts, and holds the schema
workers a submission is checked in before it reaches the core.

No ``from __future__ import annotations`` here: FastAPI reads the annotations of the
route functions (defined inside :func:`create_app`) at run time.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.websockets import WebSocketDisconnect

from runner import __version__
from runner.broker_server.driver import BrokerDriver
from runner.broker_server.edge import BodyLimit, LateResponse, SafeJSONResponse, forget_body
from runner.broker_server.retry import RetryRequest, backoff_problem
from runner.broker_server.submission import Submission, TaskLimits, prepare
from runner.broker_server.tasks import BrokerTask, TaskStatus, WaitReason
from runner.broker_server.tokens import GrantTokens, same_secret
from runner.errors import (
    IdempotencyKeyReused,
    InfrastructureError,
    LimitAboveCeiling,
    ProtocolError,
    SubmissionRefused,
    TaskTooLarge,
    TenantBacklogFull,
)
from runner.metrics import CONTENT_TYPE, CollectorRegistry, exposition
from runner.pipeline import check_requested_limits, code_size, code_too_large_message, per_task
from runner.protocol.codec import decode_runner_message, encode
from runner.sandbox.base import MAXIMUM_CODE_BYTES, MIB, MINIMUM_LIMITS, Mode

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0
BEARER = re.compile(r"^Bearer (.+)$", re.IGNORECASE)
# Idempotency-Key: visible ASCII, as Stripe's (a UUID is the usual choice), at most 255.
IDEMPOTENCY_KEY = r"^[\x21-\x7e]+$"
MAX_IDEMPOTENCY_KEY = 255
REPLAYED = "Idempotent-Replayed"  # set on the answer to a replayed request, as Stripe does


@dataclass(frozen=True, slots=True)
class LimitSource:
    """Where one of the API's per-task ceilings came from, for the refusal's message."""

    variable: str  # the setting that sets this limit (SANDBOX_MEMORY_MB)
    is_set: bool  # True: that setting gave the value; False: the bundle's default did
    bundle_key: str  # limits.memory_mb
    bundle_file: str  # the policy bundle's sandbox.toml
    bundle_ceiling: float  # the most the setting may ask for
    profile: str | None = None  # set: a tenant's profile gave the value (tenants/NAME.toml)


@dataclass(frozen=True, slots=True)
class TenantCeilings:
    """A tenant with a profile: what its tasks may ask for at most, and whence."""

    ceilings: TaskLimits
    sources: Mapping[str, LimitSource]
    max_code_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ApiConfig:
    auth_token: str
    api_keys: dict[str, str]  # key -> tenant
    max_request_bytes: int
    ceilings: TaskLimits  # what a caller may ask for at most
    # API field (timeoutSeconds, memoryMb, cpus) -> where its ceiling came from.
    ceiling_sources: Mapping[str, LimitSource] = field(default_factory=dict)
    # The runner's limits.code_bytes: larger code is refused at submission (the runner
    # would refuse it before parsing anyway; this saves queueing and sending it).
    max_code_bytes: int | None = None
    # Most JSON values (brackets and commas) a request body may hold: None, no count.
    max_request_json_values: int | None = None
    # Tenant -> its profile's ceilings (the runner checks the same profile again).
    tenants: Mapping[str, TenantCeilings] = field(default_factory=dict)


CEILING_UNITS = {"timeoutSeconds": "s", "memoryMb": "MiB", "cpus": "CPUs"}


def _number(value: float) -> str:
    return f"{value:g}"


def ceiling_refusal(name: str, value: float, ceiling: float, source: LimitSource | None) -> str:
    """Why a per-task limit asked for is refused: the limit that applied, and its origin.

    The broker's ceilings are the runner's effective limits, which are often the policy
    bundle's defaults rather than its ceilings: naming only a number would leave the
    caller comparing it with the wrong line of the bundle.
    """
    unit = CEILING_UNITS.get(name, "")
    text = f"{name} {_number(value)} exceeds {_number(ceiling)} {unit}, "
    text += "this broker's per-task limit"
    if source is None:
        return text
    bundle_ceiling = _number(source.bundle_ceiling)
    if source.profile is not None:
        profile = source.profile
        return f"{text} (the tenant's profile, {profile}; the bundle's ceiling is {bundle_ceiling})"
    if source.is_set:
        return f"{text} ({source.variable}; the policy bundle's ceiling is {bundle_ceiling})"
    return (
        f"{text} (the policy bundle's default, {source.bundle_key} in {source.bundle_file}; "
        f"the operator may raise it up to the bundle's ceiling of {bundle_ceiling} "
        f"with {source.variable})"
    )


# --- API models ----------------------------------------------------------------------


class TaskCreate(BaseModel):
    """A task to run. ``code`` is the body of a function, as in n8n's Python Code node."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Field bounds: the floors of every limit (runner.sandbox.base.MINIMUM_LIMITS: a
    # limit that rounds to nothing is no limit) and the most code any policy accepts.
    code: str = Field(
        max_length=MAXIMUM_CODE_BYTES,
        description="Python function body; use `return` for the result.",
    )
    items: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Input items: n8n items ({'json': {...}}) or plain objects (wrapped).",
    )
    mode: Literal["all_items", "per_item", "runOnceForAllItems", "runOnceForEachItem"] = Field(
        "all_items", description="Run once over `_items`, or once per `_item`."
    )
    continue_on_fail: bool = Field(False, alias="continueOnFail")
    query: Any = Field(None, description="Exposed to all-items code as `_query`.")
    timeout_seconds: float | None = Field(None, ge=MINIMUM_LIMITS.timeout_s, alias="timeoutSeconds")
    memory_mb: int | None = Field(None, ge=MINIMUM_LIMITS.memory_bytes // MIB, alias="memoryMb")
    cpus: float | None = Field(None, ge=MINIMUM_LIMITS.cpus)
    input_schema: dict[str, Any] | None = Field(
        None, alias="inputSchema", description="JSON Schema every item's `json` must match."
    )
    output_schema: dict[str, Any] | None = Field(
        None, alias="outputSchema", description="JSON Schema the result must match."
    )
    retry: RetryRequest | None = Field(
        None,
        description="Retry policy for infrastructure failures (runner_lost, "
        "container_setup_failed, ...); without one, a task has one attempt.",
    )


def request_fingerprint(body: TaskCreate) -> str:
    """What identifies a submission for its Idempotency-Key: the body's fields, defaults
    filled in, keys sorted (the same request, however it is spelled), hashed. A body
    without ``retry`` hashes as it did before the field existed (keys kept across an
    upgrade still match their requests)."""
    fields = body.model_dump(
        mode="json", by_alias=True, exclude={"retry"} if body.retry is None else None
    )
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class TaskWaitReason(BaseModel):
    code: WaitReason
    message: str


class AttemptState(BaseModel):
    attempt: int
    failedAt: str
    error: dict[str, str]


class TaskState(BaseModel):
    taskId: str
    status: Literal["queued", "offered", "running", "success", "error", "dead"]
    mode: str
    submittedAt: str
    runnerId: str | None = None
    waitReason: TaskWaitReason | None = Field(
        None, description="Why a queued task has not started yet (null once it has)."
    )
    # Only for a task with a retry policy (absent otherwise).
    attempt: int | None = Field(None, description="The current attempt (retry policy only).")
    attempts: list[AttemptState] | None = Field(
        None, description="Each failed attempt's error, oldest first (retry policy only)."
    )


class TaskList(BaseModel):
    tasks: list[TaskState]


# --- runner connections ------------------------------------------------------------------


class WsRunner:
    """One runner's WebSocket, as the core sees it: a non-blocking send and close."""

    def __init__(self, websocket: WebSocket, runner_id: str) -> None:
        self.runner_id = runner_id
        self._websocket = websocket
        self._queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()

    def send(self, message: BaseModel) -> None:
        self._queue.put_nowait(encode(message))

    def send_frame(self, frame: str) -> None:
        """A frame already encoded, as is: a ``broker:tasksettings`` frame whose settings
        were encoded at submission (:func:`runner.broker_server.submission.settings_frame`)."""
        self._queue.put_nowait(frame)

    def close(self, code: int, reason: str) -> None:
        self._queue.put_nowait((code, reason))

    async def write_forever(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, tuple):
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self._websocket.close(code=item[0], reason=item[1])
                return
            await self._websocket.send_text(item)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def create_app(
    driver: BrokerDriver,
    tokens: GrantTokens,
    config: ApiConfig,
    *,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The app over ``driver.broker``; ``registry``: the metrics served at ``/metrics``
    (none: no such route)."""
    broker = driver.broker
    app = FastAPI(
        title="sandbox-runner broker",
        default_response_class=SafeJSONResponse,
        version=__version__,
        description=(
            "Submit untrusted Python to run, each task in its own hardened container. "
            "Runners connect on /runners/_ws with n8n's task-runner protocol."
        ),
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return SafeJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(InfrastructureError)
    async def store_unavailable(request: Request, exc: InfrastructureError) -> Response:
        # A shared task store (Redis) unreachable while a task is read, listed or
        # cancelled: the caller retries; nothing was changed.
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return SafeJSONResponse(
            {"detail": f"The broker's task store is unavailable: {exc}"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return SafeJSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    # -- runner side ------------------------------------------------------------------

    @app.post(
        "/runners/auth",
        tags=["runners"],
        summary="Exchange the auth token for a single-use grant token",
        responses={
            400: {"description": 'Body is not {"token": <non-empty string>}'},
            403: {"description": "Wrong auth token"},
        },
    )
    async def runner_auth(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise HTTPException(400, 'Body must be {"token": <non-empty string>}')
        if not same_secret(token, config.auth_token):
            raise HTTPException(403, "Invalid auth token")
        return {"data": {"token": tokens.issue()}}

    @app.get("/healthz", tags=["runners"], summary="Broker health")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/runners/_ws")
    async def runner_socket(websocket: WebSocket) -> None:
        runner_id = websocket.query_params.get("id")
        if not runner_id:
            await websocket.send_denial_response(PlainTextResponse("Missing id", 400))
            return
        match = BEARER.match(websocket.headers.get("authorization", ""))
        if match is None:
            await websocket.send_denial_response(PlainTextResponse("Unauthorized", 401))
            return
        if not tokens.consume(match.group(1)):
            log.warning("runner %s presented an unknown, used or expired grant token", runner_id)
            await websocket.send_denial_response(PlainTextResponse("Forbidden", 403))
            return
        await websocket.accept()
        connection = WsRunner(websocket, runner_id)
        writer = asyncio.create_task(connection.write_forever())
        broker.runner_connected(connection)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                frame = (
                    message.get("text") if message.get("text") is not None else message.get("bytes")
                )
                try:
                    decoded = decode_runner_message(frame or "")
                except ProtocolError as exc:
                    log.warning("runner %s sent a bad frame: %s", runner_id, exc)
                    continue
                try:
                    broker.runner_message(connection, decoded)
                except Exception:
                    # A bug in handling one frame must not drop a runner that serves
                    # every tenant: log it, skip the frame, keep the connection.
                    log.exception(
                        "handling %s from runner %s failed; frame ignored",
                        type(decoded).__name__,
                        runner_id,
                    )
        except WebSocketDisconnect:
            pass
        finally:
            broker.runner_disconnected(connection)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    # -- API side ---------------------------------------------------------------------

    def tenant_of(request: Request) -> str:
        if not config.api_keys:
            if not _is_loopback(request.client.host if request.client else None):
                raise HTTPException(
                    403, "No API keys are configured: the API serves loopback clients only"
                )
            return "default"
        match = BEARER.match(request.headers.get("authorization", ""))
        if match is None:
            raise HTTPException(401, "Missing API key", headers={"WWW-Authenticate": "Bearer"})
        for key, tenant in config.api_keys.items():
            if same_secret(match.group(1), key):
                return tenant
        raise HTTPException(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})

    Tenant = Annotated[str, Depends(tenant_of)]

    def own_task(task_id: str, tenant: str) -> BrokerTask:
        task = broker.get(task_id)
        if task is None or task.tenant != tenant:
            raise HTTPException(404, f"No task {task_id}")
        return task

    def task_body(task: BrokerTask, headers: Mapping[str, str] | None = None) -> Response:
        """The result document (200, its bytes as kept) or the task's state (202)."""
        if task.document_json is not None:
            return Response(task.document_json, media_type="application/json", headers=headers)
        return SafeJSONResponse(broker.summary(task), status_code=202, headers=headers)

    def never_runs(task: BrokerTask) -> bool:
        # A closing broker dispatches nothing more; a task already with a runner may
        # still finish within the drain, so its waiters keep waiting (bounded by `wait`
        # and by the server's graceful shutdown).
        return broker.is_draining and task.status is TaskStatus.QUEUED

    async def wait_for(task: BrokerTask, wait: float) -> None:
        """Until the task ends or ``wait`` seconds pass; a queued one, until closing."""
        if wait <= 0 or task.document_json is not None or never_runs(task):
            return
        deadline = asyncio.get_running_loop().time() + wait
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(driver.wait_finished(task))]
        if not broker.is_draining:
            waiters.append(asyncio.ensure_future(driver.wait_closing()))
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            remaining = deadline - asyncio.get_running_loop().time()
            if task.document_json is None and not never_runs(task) and remaining > 0:
                await asyncio.wait([waiters[0]], timeout=remaining)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    @app.post(
        "/v1/tasks",
        tags=["tasks"],
        status_code=202,
        summary="Submit a task",
        responses={
            200: {"description": "The task ended within `wait`: its result document"},
            422: {
                "description": "Invalid task, or an Idempotency-Key already used with "
                "another request"
            },
            429: {"description": "The tenant has too many unfinished tasks"},
            503: {"description": "The broker's task store could not keep the task"},
        },
        # Documents hold the task's own values, which may carry lone surrogates: no
        # pydantic re-serialization (it refuses them); SafeJSONResponse escapes them.
        response_model=None,
    )
    async def submit(
        request: Request,
        body: TaskCreate,
        tenant: Tenant,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait")] = 0,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                min_length=1,
                max_length=MAX_IDEMPOTENCY_KEY,
                pattern=IDEMPOTENCY_KEY,
                description="Submit at most once per key and tenant: a retry with the same "
                "key and request gets the first request's task (header Idempotent-Replayed: "
                "true), with another request a 422. Kept as long as the task is.",
            ),
        ] = None,
    ) -> Response:
        idempotency: tuple[str, str] | None = None
        if idempotency_key is not None:
            # Hashing a large body takes a while: off the event loop, as prepare below.
            idempotency = (idempotency_key, await asyncio.to_thread(request_fingerprint, body))
            if (replayed := replay(tenant, idempotency)) is not None:
                return answer_submit(request, replayed, wait, replayed=True)
        own = config.tenants.get(tenant)
        max_code_bytes = own.max_code_bytes if own is not None else config.max_code_bytes
        if max_code_bytes is not None:
            size = code_size(body.code)
            if size > max_code_bytes:
                raise HTTPException(422, code_too_large_message(size, max_code_bytes))
        ceilings = own.ceilings if own is not None else config.ceilings
        sources = own.sources if own is not None else config.ceiling_sources
        try:
            # The runner's check, in the broker's words; the floors are the model's.
            check_requested_limits(
                per_task(body.timeout_seconds, body.memory_mb, body.cpus),
                per_task(ceilings.timeout_s, ceilings.memory_mb, ceilings.cpus),
                lambda name, value, ceiling: ceiling_refusal(
                    name, value, ceiling, sources.get(name)
                ),
            )
        except LimitAboveCeiling as exc:
            raise HTTPException(422, str(exc)) from None
        # Both schemas, then the items: tiny checks inline, the rest in schema workers.
        schemas = await driver.schemas.check_submission(
            tenant, body.input_schema, body.output_schema, body.items
        )
        if schemas.schema is not None:
            raise HTTPException(422, schemas.schema)
        retry = None if body.retry is None else body.retry.policy()
        if retry is not None and (problem := backoff_problem(retry, broker.config)):
            raise HTTPException(422, problem)
        if schemas.items is not None:
            raise HTTPException(422, f"Items do not match inputSchema: {schemas.items}")
        submission = Submission(
            tenant=tenant,
            code=body.code,
            items=body.items,
            mode=Mode.parse(body.mode),
            continue_on_fail=body.continue_on_fail,
            query=body.query,
            limits=TaskLimits(body.timeout_seconds, body.memory_mb, body.cpus),
            output_schema=body.output_schema,
            retry=retry,
        )
        try:
            # Walking and encoding millions of values takes seconds: off the event loop.
            prepared = await asyncio.to_thread(prepare, submission)
            # A request with the same key may have been taken meanwhile; nothing awaits
            # between this look and submit, so one of them creates the task.
            if idempotency is not None and (replayed := replay(tenant, idempotency)):
                return answer_submit(request, replayed, wait, replayed=True)
            task = broker.submit(prepared, idempotency=idempotency)
        except SubmissionRefused as exc:
            raise HTTPException(422, str(exc)) from None
        except TaskTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except TenantBacklogFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "1"}) from None
        except InfrastructureError as exc:
            log.error("a task was refused: %s", exc)
            raise HTTPException(
                503, f"The broker could not keep the task: {exc}", headers={"Retry-After": "1"}
            ) from None
        return answer_submit(request, task, wait, replayed=False)

    def replay(tenant: str, idempotency: tuple[str, str]) -> BrokerTask | None:
        try:
            return broker.replay(tenant, *idempotency)
        except IdempotencyKeyReused as exc:
            raise HTTPException(422, str(exc)) from None

    def answer_submit(
        request: Request, task: BrokerTask, wait: float, *, replayed: bool
    ) -> Response:
        """The answer to a submission (new or replayed): the task's state or result."""
        # From here on the broker holds the task as JSON text, within the tenant's
        # budget; the request's own copies (the body, its parse, the model) go now,
        # not when a long-poll ends.
        forget_body(request)
        headers = {"Location": f"/v1/tasks/{task.task_id}"}
        if replayed:
            headers[REPLAYED] = "true"
        if wait <= 0 or task.document_json is not None:
            return task_body(task, headers)

        async def answer() -> Response:
            await wait_for(task, wait)
            return task_body(task, headers)

        return LateResponse(answer)

    @app.get(
        "/v1/tasks/{task_id}",
        tags=["tasks"],
        summary="A task's result document or state",
        response_model=None,  # as for submit
    )
    async def read(
        task_id: str,
        tenant: Tenant,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
    ) -> Response:
        task = own_task(task_id, tenant)
        await wait_for(task, wait)
        return task_body(task)

    @app.get(
        "/v1/tasks",
        tags=["tasks"],
        summary="Recent tasks of the caller's tenant (status=dead: its dead letters)",
        # attempt/attempts appear for tasks with a retry policy only.
        response_model_exclude_unset=True,
    )
    async def listing(
        tenant: Tenant,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        status: Annotated[
            TaskStatus | None, Query(description="Only tasks in this status (dead: dead letters)")
        ] = None,
    ) -> TaskList:
        return TaskList(
            tasks=[TaskState(**broker.summary(t)) for t in broker.recent(tenant, limit, status)]
        )

    @app.delete("/v1/tasks/{task_id}", tags=["tasks"], summary="Cancel a task", response_model=None)
    async def cancel(task_id: str, tenant: Tenant) -> Response:
        task = own_task(task_id, tenant)
        broker.cancel(task)
        return task_body(task)

    # Broker-wide views (runner ids, every tenant's load): behind the API's own rule,
    # any tenant's key (or loopback when no keys are set). /healthz stays open.
    @app.get("/v1/health", tags=["tasks"], summary="Broker state (needs an API key)")
    async def health(tenant: Tenant) -> dict[str, Any]:
        return {"status": "ok", "runners": broker.runner_ids(), "running": broker.running_count()}

    if registry is not None:
        metrics_registry = registry

        @app.get(
            "/metrics",
            tags=["tasks"],
            summary="Prometheus metrics (needs an API key, as /v1/health)",
            response_class=PlainTextResponse,
        )
        async def metrics(tenant: Tenant) -> Response:
            return Response(exposition(metrics_registry), media_type=CONTENT_TYPE)

    app.add_middleware(
        BodyLimit,
        max_bytes=config.max_request_bytes,
        max_values=config.max_request_json_values,
    )
    return app
