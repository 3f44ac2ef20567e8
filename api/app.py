"""The FastAPI application: wiring of settings, database, queue and routers.

`create_app(settings)` migrates the database to head, builds the catalogue of served base models and the queue
(embedded workers by default) and mounts the Tinker routers. The workers start with the app's lifespan and stop
with it. The guards of `api/middleware.py` wrap every request: its id, a JSON 500 for any unhandled error, 415 for
compressed bodies and 413 for oversized ones, all answered before a body is read into memory.

Limits: one process serves both the API and (in embedded mode) the workers; scale out with `LOOM_QUEUE=external`
or `celery` and `loom worker` processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import refusals
from api.console import pages as console
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from api.deps import AppState
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, RefuseContentEncoding, RequestId, RequestLog, UnhandledErrors
from api.openai_compat import router as openai_router
from api.openapi import publish_schemas
from api.queue import PollingQueue
from api.rate_limits import RateLimitHeaders
from api.responses import NonFiniteJSONResponse
from api.routers import (
    admin,
    aliases,
    auth,
    copy_weights,
    custom_losses,
    downloads,
    futures,
    health,
    hub,
    keys,
    limits,
    queue_status,
    rest,
    run_metrics,
    sampling,
    service,
    sessions,
    tokenizers,
    training,
    usage,
)
from contract.catalogue_file import served_catalogue
from contract.settings import Settings


def build_state(settings: Settings, progress=print) -> AppState:
    upgrade_to_head(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    catalogue = served_catalogue(settings)
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
    refusals.install(app)
    publish_schemas(app, training.RAW_BODY_MODELS)
    modules = (health, service, training, sampling, futures, rest, aliases, openai_router, sessions, auth, downloads)
    routers = (custom_losses, copy_weights, usage, tokenizers, hub, keys, limits, admin, queue_status, run_metrics)
    for module in (*modules, *routers, console):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_body_bytes)
    app.add_middleware(RefuseContentEncoding)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(UnhandledErrors)
    app.add_middleware(RequestLog)
    app.add_middleware(RequestId)
    return app
