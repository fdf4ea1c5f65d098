"""``BrokerClient``: the runner's WebSocket to the broker, and nothing more.

Owns: the URL (``ws://host:port/runners/_ws?id=<runner id>``, ``wss://`` for an
``https://`` broker URI), authentication (a given grant token for the first
connection only; with an auth token, a fresh single-use grant token from
``POST /runners/auth`` before every connection), reconnecting with tenacity
(exponential back-off with jitter and a cap) on network errors and 5xx, fatal
401/403 with a clear message, the frame size limit, the 250 ms tick, and pumping
frames between the socket and :class:`~runner.protocol.machine.RunnerProtocol`.

The rules live in the machine; this module holds no business logic. Only this
module imports websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import websockets
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from runner.errors import BrokerAuthError, BrokerUnavailable
from runner.protocol.machine import TICK_INTERVAL_S, RunnerProtocol

log = logging.getLogger(__name__)

WS_PATH = "/runners/_ws"
CLOSE_TIMEOUT_S = 2.0
AUTH_PATH = "/runners/auth"


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where the runner connects. ``uri``: N8N_RUNNERS_TASK_BROKER_URI, one broker as
    n8n's, or several separated by commas (brokers sharing one Redis task store): the
    runner connects to one, and tries the next in turn when it cannot connect."""

    uri: str  # N8N_RUNNERS_TASK_BROKER_URI
    runner_id: str
    grant_token: str | None
    auth_token: str | None
    max_payload: int
    backoff_max_s: float = 30.0

    @property
    def uris(self) -> list[str]:
        return [uri.strip() for uri in self.uri.split(",") if uri.strip()] or [self.uri]

    @property
    def ws_url(self) -> str:
        return self.ws_url_of(self.uris[0])

    def ws_url_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{WS_PATH}?id={self.runner_id}"

    def auth_url_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        return f"{parts.scheme}://{parts.netloc}{AUTH_PATH}"


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, BrokerUnavailable)


class BrokerClient:
    """Keeps one connection to the broker alive and pumps frames through the machine."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        machine: RunnerProtocol,
        on_input: Callable[[], None],
        *,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._machine = machine
        self._on_input = on_input
        self._first_grant = endpoint.grant_token
        self._connection: ClientConnection | None = None
        self._uri = 0  # which of the endpoint's brokers: the next one after a failure
        self._wake = asyncio.Event()
        self.connections = 0
        # Told of every connection retry (the service counts them in its metrics).
        self._on_retry = on_retry

    @property
    def url(self) -> str:
        return self._endpoint.ws_url_of(self._broker_uri)

    @property
    def _broker_uri(self) -> str:
        uris = self._endpoint.uris
        return uris[self._uri % len(uris)]

    def _next_broker(self) -> None:
        """Try the next broker of the endpoint's list next time (one broker: the same)."""
        self._uri = (self._uri + 1) % len(self._endpoint.uris)

    def flush_soon(self) -> None:
        """Ask the sender to send what the machine has queued (after a task finished)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, reconnect, until ``stop`` is set. Raises BrokerAuthError."""
        # The machine's timers (held completions expiring as undeliverable) keep running
        # while there is no connection; a connection ticks the machine itself.
        offline = asyncio.create_task(self._tick_offline())
        try:
            await self._connect_and_serve(stop)
        finally:
            offline.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await offline

    async def _connect_and_serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            retrying = AsyncRetrying(
                retry=retry_if_exception(_is_retryable),
                wait=wait_exponential_jitter(
                    multiplier=0.5, max=self._endpoint.backoff_max_s, jitter=1.0
                ),
                before_sleep=self._log_retry,
                reraise=True,
            )
            connection: ClientConnection | None = None
            async for attempt in retrying:
                with attempt:
                    if stop.is_set():
                        return
                    try:
                        connection = await self._connect()
                    except BrokerUnavailable:
                        self._next_broker()
                        raise
            assert connection is not None
            await self._serve(connection, stop)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    # -- connecting -----------------------------------------------------------------------

    async def _grant_token(self) -> str:
        if self._first_grant is not None:
            # Kept until the broker has seen it (an upgrade that succeeded or was
            # refused): a connect that never reached the broker did not use it up.
            return self._first_grant
        if not self._endpoint.auth_token:
            raise BrokerAuthError(
                "No grant token for this connection",
                hint="the given grant token is single-use; set N8N_RUNNERS_AUTH_TOKEN so the "
                "runner can fetch a fresh one before every connection",
            )
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(
                    self._endpoint.auth_url_of(self._broker_uri),
                    json={"token": self._endpoint.auth_token},
                )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                "Cannot reach the broker's auth endpoint", hint=str(exc)
            ) from exc
        if response.status_code in (401, 403):
            raise BrokerAuthError(
                f"The broker refused the auth token ({response.status_code})",
                hint="check N8N_RUNNERS_AUTH_TOKEN on both sides",
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise BrokerUnavailable(f"Broker auth endpoint answered {response.status_code}")
        try:
            response.raise_for_status()
            token = response.json()["data"]["token"]
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as exc:
            raise BrokerAuthError(
                f"Unexpected answer from {self._endpoint.auth_url_of(self._broker_uri)}: "
                f"{response.status_code}",
                hint=response.text[:200],
            ) from exc
        return str(token)

    async def _connect(self) -> ClientConnection:
        token = await self._grant_token()
        try:
            connection = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"},
                max_size=self._endpoint.max_payload,
                open_timeout=10,
                close_timeout=CLOSE_TIMEOUT_S,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                self._first_grant = None
                raise BrokerAuthError(
                    f"Authentication failed with status {status}",
                    hint="the grant token was refused (used, expired or wrong)",
                ) from exc
            raise BrokerUnavailable(f"Broker refused the connection with {status}") from exc
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
            raise BrokerUnavailable(
                f"Cannot connect to the broker at {self.url}", hint=str(exc)
            ) from exc
        self._first_grant = None  # single-use: the next connection needs a fresh one
        self.connections += 1
        log.info("Connected to broker")
        return connection

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("Failed to connect to broker: %s - retrying...", exc)
        if self._on_retry is not None:
            self._on_retry("broker_connect")

    # -- serving a connection -----------------------------------------------------------

    async def _serve(self, connection: ClientConnection, stop: asyncio.Event) -> None:
        self._connection = connection
        self._machine.connection_made()
        try:
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(connection))
                ticker = group.create_task(self._tick(connection))
                sender = group.create_task(self._send_loop(connection))
                stopper = group.create_task(stop.wait())
                await asyncio.wait([reader, stopper], return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, ticker, sender, stopper):
                    task.cancel()
        finally:
            self._connection = None
            self._machine.connection_lost()
            self._on_input()
            with contextlib.suppress(Exception):
                await connection.close()
        if not stop.is_set():
            log.warning("Disconnected from broker - reconnecting")

    async def _read(self, connection: ClientConnection) -> None:
        try:
            async for frame in connection:
                self._machine.receive_frame(frame)
                self._on_input()
                await self._flush(connection)
        except ConnectionClosed:
            return

    async def _tick_offline(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            if self._connection is None:
                self._machine.tick()
                self._on_input()

    async def _tick(self, connection: ClientConnection) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            self._machine.tick()
            self._on_input()
            await self._flush(connection)

    async def _send_loop(self, connection: ClientConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush(connection)

    async def _flush(self, connection: ClientConnection) -> None:
        frames = self._machine.frames_to_send()
        for index, outgoing in enumerate(frames):
            try:
                await connection.send(outgoing.frame)
            except ConnectionClosed:
                self._machine.unsent(frames[index:])
                return
            except asyncio.CancelledError:
                # Cancelled while waiting for the socket to drain (the connection is
                # being torn down): this frame is already in the transport's buffer
                # (at most once, never twice); the rest go back to the machine, to be
                # sent on the next connection or reported as undeliverable.
                self._machine.unsent(frames[index + 1 :])
                raise

    async def flush_now(self) -> None:
        if self._connection is not None:
            await self._flush(self._connection)
