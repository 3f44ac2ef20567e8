"""A tenant's rate limits and quotas and its use of them now, as `GET /api/v1/limits` reports them (the console's
"limits" panel and `loom tenants show` read the same figures). A limit that is absent is not enforced."""

from __future__ import annotations

from ._base import WireModel


class RateUse(WireModel):
    """One per-minute rate: the limit, what this minute's window has used, and seconds until it resets."""

    limit: int
    used: int
    reset_seconds: float


class QuotaUse(WireModel):
    limit: int | None = None
    """Absent: no quota."""
    used: int


class TenantLimitsResponse(WireModel):
    tenant: str
    requests_per_minute: RateUse | None = None
    """Absent: no limit. Futures polls and heartbeats never count."""
    tokens_per_minute: RateUse | None = None
    """Training tokens, and sampling's Tinker prompt tokens plus n × max_tokens, submitted per minute."""
    concurrent_runs: QuotaUse
    """Loaded training runs in sessions heard from in the last two minutes."""
    stored_bytes: QuotaUse
    """Bytes of the tenant's listed checkpoints."""
