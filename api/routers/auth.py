"""Identity endpoints of the `tinker auth` CLI: the calling API key (`GET`, `DELETE /auth/apikey/me`) and JWT exchange.

`GET /auth/apikey/me` answers the key's public metadata (`tinker auth login` checks a pasted key with it): id, name,
display prefix, creation time and tenant, never the key or its hash. `DELETE /auth/apikey/me` revokes the calling
key itself and nothing else (what `tinker auth logout` does for a key minted for the CLI); later requests with it
answer 401. The revocation is an `apikey_revoke` in the tenant's audit log.

Limits: Loom authenticates with API keys only. `POST /auth/token` (the SDK's JWT exchange, used only when
`client/config` sets `pjwt_auth_enabled`, which Loom never does) answers 400 `unsupported`, and so the official
`RestClient.whoami()` / `tinker auth whoami`, which read the identity from such a JWT, stop in the SDK with its
own message; `GET /auth/apikey/me` is the way to ask Loom who a key belongs to.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from api.db.keys import revoke_api_key
from api.deps import CallerKey, State
from api.errors import APIError, ErrorCode
from loom.types import ApiKeySelfResponse, AuthTokenRequest
from loom.types.sessions import ApiKeyDetails, ApiKeyOrgDetails, ApiKeyUserDetails

router = APIRouter(prefix="/api/v1")


@router.get("/auth/apikey/me")
def get_own_api_key(key: CallerKey) -> dict[str, Any]:
    return ApiKeySelfResponse(
        key_id=int(key.id, 16),
        name=key.name,
        details=ApiKeyDetails(
            org_details=ApiKeyOrgDetails(name=key.owner), user_details=ApiKeyUserDetails(email=key.owner)
        ),
        tenant=key.owner,
        prefix=key.prefix,
        created_at=key.created_at,
    ).to_wire()


@router.delete("/auth/apikey/me", status_code=204)
def revoke_own_api_key(key: CallerKey, state: State) -> Response:
    with state.transaction() as session:
        revoke_api_key(session, key.id, key.owner, actor=key.owner)
    return Response(status_code=204)


@router.post("/auth/token")
def exchange_token(_: AuthTokenRequest | None = None) -> dict[str, Any]:
    raise APIError(
        400,
        ErrorCode.UNSUPPORTED,
        "Loom authenticates with API keys only (X-API-Key): it issues no JWTs, and its client/config never enables "
        "pjwt_auth; use GET /api/v1/auth/apikey/me to see whom a key belongs to",
    )
