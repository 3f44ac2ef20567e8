"""Expiring, HMAC-signed download links for the files of checkpoints kept in the local checkpoint store.

A link is `<base>/api/v1/downloads/<resource>?expires=<unix seconds>&signature=<hex>`, where `signature` is
HMAC-SHA256 over `"<expires>\\n<resource>"` with the server's key, and `resource` names the checkpoint, the write
it came from and the file: `<run_id>/external_weights/<name>/<version>/<file>` (`version`: a digest of the storage
URI, which is new for every write, so a link never serves a checkpoint deleted and saved again under its name).
The link is the credential: the download route takes no API key, checks signature and expiry in constant time
(`hmac.compare_digest`) and answers 403 otherwise.

The key is `LOOM_DOWNLOAD_URL_SECRET`, or else 32 random bytes made once and kept in `<data dir>/download_url_secret`
(mode 0600, created atomically, so API processes sharing a data dir agree and links survive restarts).

Limits: a link cannot be revoked before it expires except by deleting the checkpoint (or rotating the key, which
revokes every link); checkpoints in S3 are handed out as boto3 presigned URLs instead (`contract/checkpoint_s3.py`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlencode

from contract.settings import Settings

SECRET_FILE = "download_url_secret"
DOWNLOAD_ROUTE = "/api/v1/downloads"


class UrlSigner:
    """Signs and checks (resource, expiry) pairs with one HMAC-SHA256 key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, resource: str, expires: int) -> str:
        return hmac.new(self._key, f"{expires}\n{resource}".encode(), hashlib.sha256).hexdigest()

    def verify(self, resource: str, expires: int, signature: str, now: float) -> bool:
        """Whether `signature` is this key's for (resource, expires) and `now` is before `expires`."""
        expected = self.sign(resource, expires).encode()
        return hmac.compare_digest(expected, signature.encode("utf-8", "replace")) and now < expires


def storage_version(storage_uri: str) -> str:
    """A short digest naming one write of a checkpoint (its storage URI)."""
    return hashlib.sha256(storage_uri.encode()).hexdigest()[:16]


def external_file_resource(run_id: str, name: str, version: str, file_name: str) -> str:
    return f"{run_id}/external_weights/{name}/{version}/{file_name}"


def signed_url(signer: UrlSigner, base_url: str, resource: str, expires: int) -> str:
    """The absolute download link of `resource` (each path segment percent-encoded)."""
    path = "/".join(quote(part, safe="") for part in resource.split("/"))
    query = urlencode({"expires": expires, "signature": signer.sign(resource, expires)})
    return f"{base_url.rstrip('/')}{DOWNLOAD_ROUTE}/{path}?{query}"


def _persisted_key(data_dir: Path) -> bytes:
    path = data_dir / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(8)}")
        staged.write_text(secrets.token_hex(32))
        os.chmod(staged, 0o600)
        try:
            os.link(staged, path)  # create-if-absent: a concurrent first start keeps the other process's key
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    return path.read_text().strip().encode()


@functools.cache
def _signer(secret: str | None, data_dir: Path) -> UrlSigner:
    return UrlSigner(secret.encode() if secret else _persisted_key(data_dir))


def signer_for(settings: Settings) -> UrlSigner:
    """The signer of this deployment's download links (its key read or made once per process)."""
    secret = settings.download_url_secret
    return _signer(None if secret is None else secret.get_secret_value(), settings.data_dir)
