"""The FastAPI application: wiring of settings, database, queue and routers.

`create_app(settings)` migrates the database to head, builds the catalogue of served base models and the queue
(embedded workers by default) and mounts the Tinker routers. The workers start with the app's lifespan and stop
with it. A body-size guard answers oversized requests with 413 before they are read into memory.

Limits: one process serves both the API and (in embedded mode) the workers; scale out with `LOOM_QUEUE=external`
or `celery` and `loom worker` processes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.db.session import make_engine, make_session_factory, upgrade_to_head
from api.deps import AppState
from api.errors import ErrorCode, error_body, install_error_handlers
from api.openai_compat import router as openai_router
from api.queue import PollingQueue
from api.responses import NonFiniteJSONResponse
from api.routers import aliases, futures, health, rest, sampling, service, training
from contract.catalogue import Catalogue
from contract.settings import Settings


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes` (by Content-Length, or while streaming)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
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
        import json

        body = json.dumps(
            error_body(ErrorCode.BODY_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes", status=413)
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class RequestId:
    """ASGI middleware: every response carries `x-request-id` (the client's, if it sent one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = dict(scope["headers"]).get(b"x-request-id") or f"req-{uuid.uuid4().hex}".encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_state(settings: Settings, progress=print) -> AppState:
    upgrade_to_head(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    catalogue = Catalogue.serving(settings.base_models)
    queue: PollingQueue
    if settings.queue == "embedded":
        from api.embedded_queue import EmbeddedQueue

        queue = EmbeddedQueue(settings, catalogue, sessions, progress)
    elif settings.queue == "external":
        queue = PollingQueue()
    else:
        from api.celery_queue import CeleryQueue

        queue = CeleryQueue(
            sessions, settings.broker_url, dead_after=settings.worker_dead_seconds, max_attempts=settings.max_attempts
        )
    readers = make_session_factory(make_engine(settings.database_url, read_only=True))
    return AppState(settings, catalogue, sessions, queue, readers)


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    state = state or build_state(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.queue.start()
        try:
            yield
        finally:
            state.queue.stop()

    app = FastAPI(
        title="Loom",
        description="Tinker-compatible training service",
        lifespan=lifespan,
        default_response_class=NonFiniteJSONResponse,
    )
    app.state.loom = state
    install_error_handlers(app)
    for module in (health, service, training, sampling, futures, rest, aliases, openai_router):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_body_bytes)
    app.add_middleware(RequestId)
    return app
