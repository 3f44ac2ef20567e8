"""A tenant's own API keys, as `/api/v1/keys` and `loom keys` manage them: list, create (the plaintext is in the
create response only, once) and revoke. Never the key or its hash after creation."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from ._base import WireModel

KEY_NAME_MAX = 64


class ApiKeyInfo(WireModel):
    """One of the tenant's keys: its id (hexadecimal, as `loom keys` prints it), name and display prefix."""

    id: str
    name: str
    prefix: str
    """The key's first 12 characters (`tml-` and 8 more), to tell keys apart."""
    created_at: datetime
    revoked_at: datetime | None = None
    """When it was revoked; absent for a live key."""


class ListApiKeysResponse(WireModel):
    keys: list[ApiKeyInfo]
    """The tenant's keys, oldest first, revoked ones included."""


class CreateApiKeyRequest(WireModel):
    name: str = Field(min_length=1, max_length=KEY_NAME_MAX)


class CreateApiKeyResponse(WireModel):
    key: ApiKeyInfo
    api_key: str
    """The new key's plaintext: shown this once, stored only as a hash."""
