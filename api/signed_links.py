"""Expiring links that need no API key: an HMAC-SHA256 over (resource, expiry), keyed by the issuing API key.

`tinker session export-trace` downloads the trace it is pointed to with a plain GET and no credentials, so the
link itself must prove that its issuer may read the resource. The MAC key is the issuing API key's stored SHA-256
digest: it never leaves the server, the key's holder could read the resource anyway, and revoking the key revokes
every link it issued. The MAC is `api.download_links.UrlSigner`'s (constant-time check, then the expiry).

Limits: a link is good until it expires or its key is revoked, however often it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from api.db.models import ApiKey
from api.download_links import UrlSigner


@dataclass(frozen=True)
class SignedLink:
    key: str
    """The issuing key's id."""
    expires: int
    """Unix seconds."""
    signature: str

    def query(self) -> dict[str, str]:
        return {"key": self.key, "expires": str(self.expires), "signature": self.signature}


def _signer(key: ApiKey) -> UrlSigner:
    return UrlSigner(bytes.fromhex(key.key_hash))


def sign(key: ApiKey, resource: str, lifetime: timedelta, now: datetime | None = None) -> SignedLink:
    expires = int(((now or datetime.now(UTC)) + lifetime).timestamp())
    return SignedLink(key.id, expires, _signer(key).sign(resource, expires))


def verify(session: Session, resource: str, link: SignedLink, now: datetime | None = None) -> ApiKey | None:
    """The live key that signed `link` for `resource`, if the signature holds and the link has not expired."""
    key = session.get(ApiKey, link.key)
    if key is None or key.revoked_at is not None:
        return None
    moment = (now or datetime.now(UTC)).timestamp()
    return key if _signer(key).verify(resource, link.expires, link.signature, moment) else None
