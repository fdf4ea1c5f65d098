"""The HTTP edge of the broker's API: what every request and answer goes through.

Owns: the request body caps, in bytes and in JSON values, that the client gets to
read as a 413 (:class:`BodyLimit`), JSON answers that can always be encoded
(:class:`SafeJSONResponse`), answers made after the endpoint has returned, so a
long-poll holds no parsed request (:class:`LateResponse`, :func:`forget_body`).

ASGI and Starlette mechanics only: no broker state, no routes (those are
:mod:`runner.broker_server.app`'s).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class SafeJSONResponse(JSONResponse):
    """JSON that can always be sent: text the caller gave us may hold lone surrogates
    (``"\\ud800"`` is valid JSON), which UTF-8 cannot encode; ASCII escapes can. Without
    it, echoing such input (a 422's ``input``, a result) would be a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class BodyLimit:
    """Refuse HTTP bodies over ``max_bytes``, or holding more than ``max_values`` JSON
    values, with 413, before any of it is parsed.

    Bytes alone do not bound what parsing costs: 16 MiB of ``[{},{},...]`` is 5.6
    million dicts, and the broker's parse, validation and wrapping of them peaked at
    ~2.1 GB of RSS (measured through ``sandbox-runner broker``), ~190 bytes per value,
    ~130 times the body. Every value but the first is preceded by a comma or an opening
    bracket, so their count (a C-speed ``bytes.count``, no parse) bounds the number of
    values from above; brackets and commas inside strings count too, which can only
    refuse a body early, never let a larger one through.

    The client must get to read the 413. It is usually still sending, and a server that
    answers and closes with unread data on the socket makes the kernel reset the
    connection, which throws away the answer too: the client sees a reset and no status
    (uvicorn closes right after the answer whenever the client sent ``Connection:
    close``, as urllib does). So the rest of a refused body is read and dropped before
    the answer, up to :data:`DISCARD_FACTOR` times the limit; a body larger still is cut
    off (its sender gets the reset; a client that waits for ``100 Continue`` gets the
    413 without sending anything).
    """

    DISCARD_FACTOR = 4

    def __init__(self, app: ASGIApp, max_bytes: int, max_values: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_values = max_values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Reading would send "100 Continue" to a client that waits for it: it
            # would then send the body for nothing. Such a client reads the 413 first.
            expects = headers.get(b"expect", b"").lower() == b"100-continue"
            if not expects and int(declared) <= self.max_bytes * self.DISCARD_FACTOR:
                await self._discard(receive, 0)
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body"):
                    await self._discard(receive, size)
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        if self.max_values is not None:
            values = sum(
                chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{") for chunk in chunks
            )
            if values > self.max_values:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    f"Request body holds more than {self.max_values} JSON values "
                    f"({values} brackets and commas; SANDBOX_MAX_REQUEST_JSON_VALUES)",
                )
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            body = b"".join(chunks)
            chunks.clear()  # this closure lives as long as the request (a long-poll)
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, size: int) -> None:
        """Read the rest of the body and drop it, up to the discard cap."""
        while size <= self.max_bytes * self.DISCARD_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, detail: str | None = None
    ) -> None:
        if detail is None:
            detail = (
                f"Request body exceeds the limit of {self.max_bytes} bytes "
                "(SANDBOX_MAX_REQUEST_BYTES)"
            )
        response = JSONResponse(
            {"detail": detail},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class LateResponse(Response):
    """A response made when it is sent: ``answer`` runs once the endpoint has returned.

    FastAPI holds an endpoint's arguments (the parsed request body) until the endpoint
    returns; a long-poll that waited inside the endpoint kept them for up to
    :data:`runner.broker_server.app.MAX_WAIT_S`: ~100 times the body's size for many small items.
    """

    def __init__(self, answer: Callable[[], Awaitable[Response]]) -> None:
        super().__init__()
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._answer()
        response.background = self.background
        await response(scope, receive, send)


def forget_body(request: Request) -> None:
    """Drop starlette's caches of the request body (the bytes and their ``json.loads``):
    once the task is encoded, they are only memory held for the rest of the request."""
    for cache in ("_body", "_json"):
        request.__dict__.pop(cache, None)
