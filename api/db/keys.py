"""API keys: issue, authenticate and revoke.

A key's plaintext (``tml-`` + 43 URL-safe characters, 256 random bits) is shown
to its owner once; the database keeps only its SHA-256 hex digest and a
12-character display prefix. Authentication looks the digest up, so no
constant-time comparison is needed. Like the job store, these functions work in
the caller's transaction and never commit.
"""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.audit import Event, record
from api.db.models import ApiKey
from api.db.tenants import ensure_tenant
from api.db.types import utcnow

KEY_PREFIX = "tml-"
DISPLAY_PREFIX_LENGTH = 12


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_api_key(session: Session, owner: str, name: str, actor: str | None = None) -> tuple[ApiKey, str]:
    """Issue a key for ``owner`` (a new owner becomes a tenant); returns the row and the plaintext, which is not
    stored. With an ``actor`` (a key made over the API) the issue is an ``apikey_create`` in ``owner``'s audit log."""
    ensure_tenant(session, owner)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, name=name, key_hash=hash_api_key(plaintext), prefix=plaintext[:DISPLAY_PREFIX_LENGTH])
    session.add(key)
    session.flush()
    if actor is not None:
        record(
            session, owner=owner, actor=actor, event=Event.APIKEY_CREATE, key_id=key.id, name=name, prefix=key.prefix
        )
    return key, plaintext


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key with this plaintext, or None if unknown or revoked."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext), ApiKey.revoked_at.is_(None)))


def list_api_keys(session: Session, owner: str) -> list[ApiKey]:
    """``owner``'s keys, oldest first, revoked ones included."""
    return list(session.scalars(select(ApiKey).where(ApiKey.owner == owner).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_api_key(session: Session, key_id: str, owner: str, actor: str) -> bool:
    """Revoke ``owner``'s key ``key_id`` at ``actor``'s request (an ``apikey_revoke`` in ``owner``'s audit log);
    False if no such live key belongs to ``owner``."""
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.owner == owner, ApiKey.revoked_at.is_(None)))
    if key is None:
        return False
    key.revoked_at = utcnow()
    record(
        session, owner=owner, actor=actor, event=Event.APIKEY_REVOKE, key_id=key.id, name=key.name, prefix=key.prefix
    )
    session.flush()
    return True
