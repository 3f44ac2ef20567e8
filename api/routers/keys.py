"""A tenant's own API keys: `GET /api/v1/keys` lists them (id, name, display prefix, created, revoked), `POST` makes
one (its plaintext is in that response only), `DELETE /api/v1/keys/{key_id}` revokes one. The web console and
`loom keys` do the same through these routes or the same `api/db/keys.py` functions.

Every route acts on the caller's tenant only: another tenant's key id answers 404 exactly as an unknown one does.
A revoked key fails the next request it authenticates (every request looks its key up). Creating and revoking are
recorded in the tenant's audit log (`apikey_create`, `apikey_revoke`), with the caller's tenant as actor.

Limits: a tenant may hold any number of keys; keys carry no scopes (each can do everything its tenant can).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from api.db.keys import create_api_key, list_api_keys, revoke_api_key
from api.db.models import ApiKey
from api.deps import State, Tenant
from api.errors import not_found
from loom.types import ApiKeyInfo, CreateApiKeyRequest, CreateApiKeyResponse, ListApiKeysResponse

router = APIRouter(prefix="/api/v1")


def key_info(key: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(id=key.id, name=key.name, prefix=key.prefix, created_at=key.created_at, revoked_at=key.revoked_at)


@router.get("/keys")
def list_keys(owner: Tenant, state: State) -> dict[str, Any]:
    with state.reading() as session:
        return ListApiKeysResponse(keys=[key_info(key) for key in list_api_keys(session, owner)]).to_wire()


@router.post("/keys")
def create_key(body: CreateApiKeyRequest, owner: Tenant, state: State) -> dict[str, Any]:
    with state.transaction() as session:
        key, plaintext = create_api_key(session, owner, body.name, actor=owner)
        return CreateApiKeyResponse(key=key_info(key), api_key=plaintext).to_wire()


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: str, owner: Tenant, state: State) -> Response:
    with state.transaction() as session:
        if not revoke_api_key(session, key_id, owner, actor=owner):
            raise not_found(f"no live API key {key_id!r}")
    return Response(status_code=204)
