"""Tenants, their own limits and the operator role: ensure or create a tenant, list, set or clear its limits.

A tenant is the `owner` every key, run and checkpoint carries; its row holds the rate limits and quotas that differ
from the deployment's defaults (a NULL column is "use the default") and whether it is an operator (its keys manage
tenants). Like the job store, these functions work in the caller's transaction and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import Tenant


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's effective limits; None is "no limit"."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    concurrent_runs: int | None
    stored_bytes: int | None


LIMIT_COLUMNS = tuple(limit.name for limit in fields(TenantLimits))
"""The per-tenant limits: `TenantLimits`' fields, and the `Tenant` columns of the same names."""


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant's row, created (with no limits of its own) if it has none yet."""
    tenant = session.get(Tenant, name)
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


class TenantExists(Exception):
    pass


def create_tenant(session: Session, name: str, operator: bool, limits: dict[str, int | None]) -> Tenant:
    """A new tenant (`TenantExists` if the name is taken) with its own `limits` (None: the default)."""
    if session.get(Tenant, name) is not None:
        raise TenantExists(f"tenant {name!r} already exists")
    session.add(Tenant(name=name, operator=operator))
    session.flush()
    return set_limits(session, name, limits)


def is_operator(session: Session, name: str) -> bool:
    tenant = session.get(Tenant, name)
    return tenant is not None and tenant.operator


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def set_limits(session: Session, name: str, limits: dict[str, int | None]) -> Tenant:
    """Set (a positive number) or clear (None: back to the deployment's default) some of a tenant's limits,
    creating the tenant if it is new."""
    unknown = set(limits) - set(LIMIT_COLUMNS)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; a tenant has {list(LIMIT_COLUMNS)}")
    tenant = ensure_tenant(session, name)
    for column, value in limits.items():
        if value is not None and value <= 0:
            raise ValueError(f"{column} must be a positive number, or cleared to use the deployment's default")
        setattr(tenant, column, value)
    return tenant


def effective_limits(session: Session, name: str, defaults: TenantLimits) -> TenantLimits:
    """The tenant's own limits where it has them, the deployment's `defaults` elsewhere."""
    tenant = session.get(Tenant, name)
    own = {column: getattr(tenant, column, None) for column in LIMIT_COLUMNS}
    return TenantLimits(**{column: own[column] or getattr(defaults, column) for column in LIMIT_COLUMNS})
