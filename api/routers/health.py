"""Readiness: `GET /readyz` answers 200 `{"status": "ready"}` only while the database answers `SELECT 1`.

Deploy manifests use it as the readiness probe (take the pod out of rotation while its database is unreachable);
`/api/v1/healthz` stays the liveness probe and never touches the database, so a database outage does not get
healthy API processes restarted.

Limits: the check gives up after `READY_TIMEOUT_S` (503 with `Retry-After`); a `SELECT 1` it abandons keeps its
pool thread until the database watchdog (api/db/watchdog.py) fails it. Unauthenticated, like liveness.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.db.session import database_unavailable
from api.deps import AppState, State
from api.errors import unavailable_response

router = APIRouter()

READY_TIMEOUT_S = 2.0


def _select_one(state: AppState) -> None:
    with state.reading() as session:
        session.execute(text("SELECT 1"))


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    try:
        await asyncio.wait_for(asyncio.to_thread(_select_one, state), READY_TIMEOUT_S)
    except TimeoutError:
        return unavailable_response(f"the database did not answer within {READY_TIMEOUT_S:g}s")
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        return unavailable_response()
    return JSONResponse({"status": "ready"})
