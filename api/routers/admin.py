"""Tenant management for operators: `/api/v1/admin/tenants`, with an operator tenant's key.

- `GET /admin/tenants` lists every tenant with its own limits, operator role, live keys, live runs and stored
  bytes (what its quotas count); `GET /admin/tenants/{name}` shows one.
- `POST /admin/tenants` creates a tenant with its first API key (plaintext in that response only) and, optionally,
  its own limits and the operator role; a taken name is 409.
- `PATCH /admin/tenants/{name}` changes the fields it is sent: a limit sent as null goes back to the deployment's
  default (`LOOM_TENANT_*`); `operator` grants or takes the role (an operator cannot take its own).

A key of a tenant that is not an operator gets 403 `forbidden` on every route here. `loom tenants` does the same
from the server's command line; the embedded server's own tenant (`local`) is an operator.

Limits: listing computes each tenant's figures with a few queries per tenant (operators' pages, not hot paths).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.keys import create_api_key
from api.db.models import ApiKey, Tenant
from api.db.tenants import LIMIT_COLUMNS, TenantExists, create_tenant, list_tenants, set_limits
from api.deps import Operator, State
from api.errors import APIError, ErrorCode, invalid, not_found
from api.rate_limits import live_runs, stored_bytes
from loom.types import (
    CreateTenantRequest,
    CreateTenantResponse,
    ListTenantsResponse,
    TenantInfo,
    TenantOwnLimits,
    UpdateTenantRequest,
)

router = APIRouter(prefix="/api/v1/admin")


def tenant_info(session: Session, tenant: Tenant) -> TenantInfo:
    keys = session.scalar(select(func.count(ApiKey.id)).where(ApiKey.owner == tenant.name, ApiKey.revoked_at.is_(None)))
    return TenantInfo(
        name=tenant.name,
        created_at=tenant.created_at,
        operator=tenant.operator,
        limits=TenantOwnLimits(**{column: getattr(tenant, column) for column in LIMIT_COLUMNS}),
        live_keys=keys,
        live_runs=live_runs(session, tenant.name),
        stored_bytes=stored_bytes(session, tenant.name),
    )


def _tenant(session: Session, name: str) -> Tenant:
    tenant = session.get(Tenant, name)
    if tenant is None:
        raise not_found(f"tenant {name!r} not found")
    return tenant


@router.get("/tenants")
def get_tenants(_: Operator, state: State) -> dict[str, Any]:
    with state.reading() as session:
        return ListTenantsResponse(tenants=[tenant_info(session, t) for t in list_tenants(session)]).to_wire()


@router.get("/tenants/{name}")
def get_tenant(name: str, _: Operator, state: State) -> dict[str, Any]:
    with state.reading() as session:
        return tenant_info(session, _tenant(session, name)).to_wire()


@router.post("/tenants", status_code=201)
def post_tenant(body: CreateTenantRequest, operator: Operator, state: State, response: Response) -> dict[str, Any]:
    with state.transaction() as session:
        try:
            tenant = create_tenant(session, body.name, body.operator, body.limits.model_dump())
        except TenantExists as exc:
            raise APIError(409, ErrorCode.CONFLICT, str(exc), "name") from exc
        _, plaintext = create_api_key(session, body.name, "first key", actor=operator)
        info = tenant_info(session, tenant)
    response.headers["location"] = f"/api/v1/admin/tenants/{body.name}"
    return CreateTenantResponse(tenant=info, api_key=plaintext).to_wire()


@router.patch("/tenants/{name}")
def patch_tenant(name: str, body: UpdateTenantRequest, operator: Operator, state: State) -> dict[str, Any]:
    sent = body.model_fields_set
    with state.transaction() as session:
        tenant = _tenant(session, name)
        if "operator" in sent:
            if body.operator is None:
                raise invalid("operator must be true or false", "operator")
            if name == operator and not body.operator:
                raise invalid("an operator cannot take its own role; another operator can", "operator")
            tenant.operator = body.operator
        set_limits(session, name, {column: getattr(body, column) for column in LIMIT_COLUMNS if column in sent})
        return tenant_info(session, tenant).to_wire()
