"""ASGI guards around every request: its id, a JSON answer for any unhandled error, and the body's size and encoding.

- `RequestId`: every response carries `x-request-id` (the client's, if it sent a short printable one) and every
  error body carries the same id (`api.errors.REQUEST_ID`).
- `RequestLog`: one JSON access line per request on `loom.access` (request id, tenant, route, status, latency,
  bytes, ...) and one error line per 4xx/5xx on `loom.errors` with the code and reason the client got (and the
  traceback of an exception), whatever the server's `--log-level` (`api/request_log.py`): what an operator greps for
  when a tenant quotes a request id.
- `UnhandledErrors`: an exception no handler took becomes a 500 in the JSON error shape (`internal_error`), logged
  by `RequestLog` with its traceback; the exception is not re-raised, so the server keeps the connection usable.
- `RefuseContentEncoding`: a request body with any `Content-Encoding` but `identity` is a 415, answered before a
  byte of it is read — `/api/v1/client/config` announces no compression (`proto_compress_fwdbwd=False`), so a
  compressed body is never decompressed (no zip bombs).
- `BodySizeLimit`: 413 for bodies over `max_bytes` (by Content-Length, or while streaming).

Limits: an exception raised after a response has started (a stream) cannot be turned into an error body; it is
re-raised for the server to log.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import REQUEST_ID, ErrorCode, error_body
from api.request_log import ERROR_BODY_LIMIT, access_log, error_of, errors_log

UNHANDLED = "loom.unhandled_exception"
"""Scope key under which `UnhandledErrors` leaves the exception it answered with a 500, for `RequestLog`."""

CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
"""A client-chosen `x-request-id` that is echoed; anything else is replaced by a server-made id."""


async def send_error(send: Send, status: int, code: ErrorCode, message: str, param: str | None = None) -> None:
    body = json.dumps(error_body(code, message, param, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestId:
    """Give every request an id: echoed in `x-request-id` and set in `REQUEST_ID` while the request is served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = sent if CLIENT_REQUEST_ID.fullmatch(sent) else f"req-{uuid.uuid4().hex}".encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        token = REQUEST_ID.set(request_id.decode())
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestLog:
    """Log every request on `loom.access`, and every 4xx/5xx or exception on `loom.errors` with the reason the client
    was given (`api/request_log.py` has the fields). The lines are written just before the last byte of the answer
    is sent, so a client that has its answer finds them in the log; a request that fails without one (or mid-stream)
    is logged when it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, received, sent, error_body = time.monotonic(), 0, 0, 0, bytearray()
        logged = False

        def log(failure: BaseException | None = None) -> None:
            nonlocal logged
            logged = True
            request = _request_fields(scope, status or 500)  # no answer started: the server answers 500
            _log_access(scope, request, round(1000 * (time.monotonic() - started), 1), received, sent)
            if request["status"] >= 400 or failure is not None:
                _log_error(request, bytes(error_body), scope.get(UNHANDLED) or failure)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                sent += len(body)
                if status >= 400:
                    error_body.extend(body[: ERROR_BODY_LIMIT - len(error_body)])
                if not message.get("more_body", False):
                    log()
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BaseException as exc:
            if not logged:
                log(exc)
            raise
        if not logged:
            log()


def _request_fields(scope: Scope, status: int) -> dict[str, Any]:
    return {
        "request_id": REQUEST_ID.get(),
        "tenant": scope.get("state", {}).get("tenant") or "-",
        "method": scope.get("method"),
        "route": getattr(scope.get("route"), "path", None) or "-",
        "path": scope.get("path"),
        "status": status,
    }


def _log_access(scope: Scope, request: dict[str, Any], elapsed_ms: float, received: int, sent: int) -> None:
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length", b"")
    client = scope.get("client") or ("-", 0)
    fields = {
        **request,
        "ms": elapsed_ms,
        "request_bytes": int(declared) if declared.isdigit() else received,
        "response_bytes": sent,
        "client": f"{client[0]}:{client[1]}",
        "user_agent": headers.get(b"user-agent", b"-").decode("latin-1")[:200],
    }
    access_log.info("%s %s %d", request["method"], request["path"], request["status"], extra={"fields": fields})


def _log_error(request: dict[str, Any], body: bytes, exception: BaseException | None) -> None:
    code, reason = error_of(body) if body else ("-", repr(exception))
    errors_log.log(
        logging.WARNING if request["status"] < 500 and exception is None else logging.ERROR,
        "%s %s %d %s: %s",
        request["method"],
        request["path"],
        request["status"],
        code,
        reason,
        exc_info=(type(exception), exception, exception.__traceback__) if exception is not None else None,
        extra={"fields": {**request, "code": code, "reason": reason}},
    )


class UnhandledErrors:
    """Answer an exception that escaped every handler with a 500 JSON error instead of a dropped connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            scope[UNHANDLED] = exc  # `RequestLog` logs it, with its traceback
            if started:
                raise
            await send_error(send, 500, ErrorCode.INTERNAL, "internal server error; quote the request_id to report it")


class RefuseContentEncoding:
    """415 for a compressed request body, before reading it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            encoding = dict(scope["headers"]).get(b"content-encoding", b"").decode("latin-1")
            codings = {c.strip().lower() for c in encoding.split(",") if c.strip()}
            if codings - {"identity"}:
                message = f"Content-Encoding {encoding!r} is not accepted: this server takes uncompressed bodies"
                return await send_error(send, 415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, message, "Content-Encoding")
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for bodies over `max_bytes` (by Content-Length, or while streaming)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await send_error(send, 400, ErrorCode.INVALID_REQUEST, "malformed Content-Length", "Content-Length")
        if int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, 413, ErrorCode.BODY_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes")


class _TooLarge(Exception):
    pass
