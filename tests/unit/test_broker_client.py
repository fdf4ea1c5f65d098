"""The runner's broker client: grant tokens across failed and successful connects."""

from __future__ import annotations

import asyncio

import pytest
from helpers import free_port
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from runner.broker import BrokerClient, BrokerEndpoint
from runner.errors import BrokerAuthError, BrokerUnavailable
from runner.protocol.machine import Outgoing


def client_for(port: int, grant: str | None, auth: str | None = None) -> BrokerClient:
    endpoint = BrokerEndpoint(
        uri=f"http://127.0.0.1:{port}",
        runner_id="r" * 22,
        grant_token=grant,
        auth_token=auth,
        max_payload=1024 * 1024,
        backoff_max_s=1,
    )
    return BrokerClient(endpoint, machine=None, on_input=lambda: None)  # type: ignore[arg-type]


async def test_a_connect_that_never_reached_the_broker_keeps_the_grant_token() -> None:
    port = free_port()
    client = client_for(port, grant="grant-1")
    # Nobody listens yet: a retryable failure, twice, never "no grant token".
    for _ in range(2):
        with pytest.raises(BrokerUnavailable):
            await client._connect()

    seen: list[str | None] = []

    def check(connection: ServerConnection, request: Request) -> Response | None:
        seen.append(request.headers.get("Authorization"))
        return None

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", port, process_request=check):
        connection = await client._connect()
        await connection.close()
        assert seen == ["Bearer grant-1"]
        # Single-use: without an auth token to fetch a fresh one, a reconnect is fatal.
        with pytest.raises(BrokerAuthError, match="No grant token"):
            await client._connect()


async def test_a_refused_grant_token_is_fatal_and_not_reused() -> None:
    port = free_port()
    client = client_for(port, grant="stale")

    def refuse(connection: ServerConnection, request: Request) -> Response:
        return Response(403, "Forbidden", Headers(), b"")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", port, process_request=refuse):
        with pytest.raises(BrokerAuthError, match="Authentication failed with status 403"):
            await client._connect()
        with pytest.raises(BrokerAuthError, match="No grant token"):
            await client._connect()


class _Machine:
    def __init__(self, frames: list[str]) -> None:
        self.frames = [Outgoing(frame=f, task_id=f) for f in frames]
        self.held: list[str] = []

    def frames_to_send(self) -> list[Outgoing]:
        frames, self.frames = self.frames, []
        return frames

    def unsent(self, frames: list[Outgoing]) -> None:
        self.held.extend(str(f.frame) for f in frames)


class _StuckConnection:
    """Sends the first frame, then waits forever for the socket to drain."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.stuck = asyncio.Event()

    async def send(self, frame: str) -> None:
        self.sent.append(frame)
        if len(self.sent) == 2:
            self.stuck.set()
            await asyncio.Event().wait()


async def test_frames_after_the_one_in_flight_survive_a_cancelled_flush() -> None:
    machine = _Machine(["done-1", "done-2", "done-3", "done-4"])
    client = client_for(free_port(), grant="g")
    client._machine = machine  # type: ignore[assignment]
    connection = _StuckConnection()
    flush = asyncio.create_task(client._flush(connection))  # type: ignore[arg-type]
    await connection.stuck.wait()
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    # done-2 is in the transport (never sent twice); 3 and 4 go back to the machine.
    assert connection.sent == ["done-1", "done-2"]
    assert machine.held == ["done-3", "done-4"]
