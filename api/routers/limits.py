"""`GET /api/v1/limits`: the calling tenant's rate limits and quotas, and its use of them right now.

What the console shows as the published limits, and what a client can read before it plans a burst. The figures
are those `api/rate_limits.py` enforces (the tenant's own limits over the deployment's defaults). Reading them
counts against no rate.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.db.tenants import TenantLimits
from api.deps import State, Tenant
from api.rate_limits import WindowReading, live_runs, stored_bytes
from loom.types import QuotaUse, RateUse, TenantLimitsResponse

router = APIRouter(prefix="/api/v1")


def _rate(reading: WindowReading | None) -> RateUse | None:
    if reading is None:
        return None
    return RateUse(limit=reading.limit, used=reading.used, reset_seconds=round(reading.reset_seconds, 3))


@router.get("/limits")
def get_limits(request: Request, owner: Tenant, state: State) -> dict[str, Any]:
    limits: TenantLimits = request.state.tenant_limits
    limiter = state.rate_limiter
    with state.reading() as session:
        runs, stored = live_runs(session, owner), stored_bytes(session, owner)
    return TenantLimitsResponse(
        tenant=owner,
        requests_per_minute=_rate(limiter.reading(owner, "requests", limits.requests_per_minute)),
        tokens_per_minute=_rate(limiter.reading(owner, "tokens", limits.tokens_per_minute)),
        concurrent_runs=QuotaUse(limit=limits.concurrent_runs, used=runs),
        stored_bytes=QuotaUse(limit=limits.stored_bytes, used=stored),
    ).to_wire()
