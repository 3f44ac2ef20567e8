"""Tenants as an operator manages them (`/api/v1/admin/tenants`, `loom tenants`): list, create (with a first key,
shown once), change a tenant's own limits or operator role. A tenant's own view of its limits is in
`tenant_limits.py`."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from ._base import WireModel

TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
"""A tenant's name: 1–64 characters, letters, digits and `._@-`, starting with a letter or digit."""


class TenantOwnLimits(WireModel):
    """Limits a tenant has of its own; an absent (null) one is the deployment's default (`LOOM_TENANT_*`)."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    concurrent_runs: int | None = Field(default=None, gt=0)
    stored_bytes: int | None = Field(default=None, gt=0)


class TenantInfo(WireModel):
    name: str
    created_at: datetime
    operator: bool
    """An operator's keys also manage tenants."""
    limits: TenantOwnLimits
    live_keys: int
    live_runs: int
    """Loaded runs in sessions heard from in the last two minutes (what the concurrent-runs quota counts)."""
    stored_bytes: int
    """Bytes of the tenant's listed checkpoints (what the stored-bytes quota counts)."""


class ListTenantsResponse(WireModel):
    tenants: list[TenantInfo]
    """Every tenant, by name."""


class CreateTenantRequest(WireModel):
    name: str = Field(pattern=TENANT_NAME_PATTERN)
    operator: bool = False
    limits: TenantOwnLimits = Field(default_factory=TenantOwnLimits)


class CreateTenantResponse(WireModel):
    tenant: TenantInfo
    api_key: str
    """The tenant's first key: shown this once, stored only as a hash."""


class UpdateTenantRequest(TenantOwnLimits):
    """Only the fields sent change: a limit sent as null goes back to the deployment's default."""

    operator: bool | None = None
