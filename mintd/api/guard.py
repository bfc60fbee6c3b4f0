"""The outermost layer of every request: a request id, a body-size cap, a JSON-depth cap, and the
last word on server faults.

Both caps act before any route parses anything, so a hostile body costs at most `max_body_bytes` of
memory for as long as it takes to refuse it. A declared `Content-Length` beyond the cap is refused
without reading the body; a chunked body is read until it passes the cap. Routes that take uploads
(PEFT archive import) get `max_upload_bytes` instead. An exception no route handled is logged with
the request id and answered 500 naming only that id: no stack trace or server path reaches a client,
and the connection stays healthy (nothing is re-raised into the HTTP server).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mintd.config import ServeSettings

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
_UPLOAD_ROUTE = re.compile(r"^/api/v1/catalog/adapters/[^/]+/import$")
# A JSON string, escapes included (the unrolled form: linear time, no backtracking).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def json_depth(body: bytes) -> int:
    """How deeply `body`'s arrays and objects nest, without parsing it (strings may hold brackets)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int64).max())


class RequestGuard:
    """ASGI middleware: tags each request with an id (echoed as X-Request-Id) and enforces the caps."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = secrets.token_hex(8)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((REQUEST_ID_HEADER.encode(), rid.encode()))
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the one place a fault becomes a 500
            log.error("request %s: unhandled error on %s", rid, scope.get("path"), exc_info=exc)
            if not started:
                detail = f"internal error ({type(exc).__name__}); quote request id {rid} to the operator"
                await _refuse(send_with_id, 500, detail)

    async def _guarded(self, scope: Scope, receive: Receive, send_with_id: Send) -> None:
        upload = bool(_UPLOAD_ROUTE.match(scope["path"]))
        cap = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > cap:
            await _refuse(send_with_id, 413, f"request body: {declared} bytes, more than the {cap} allowed")
            return
        body = await _read_body(receive, cap)
        if body is None:
            await _refuse(send_with_id, 413, f"request body: more than the {cap} bytes allowed")
            return
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        if body and not upload and ("json" in content_type or not content_type):
            depth = json_depth(body)
            if depth > self.settings.max_json_depth:
                cap_depth = self.settings.max_json_depth
                detail = f"request body: JSON nested {depth} deep, more than the {cap_depth} allowed"
                await _refuse(send_with_id, 400, detail)
                return
        await self.app(scope, _replay(body, receive), send_with_id)


async def _read_body(receive: Receive, cap: int) -> bytes | None:
    """The whole body, or None once it passes `cap` (the rest is left unread)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect, as usual

    return replay


async def _refuse(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
