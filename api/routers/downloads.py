"""Downloads of exported weights: `get_external_weights_urls` and the signed-link route it points at.

`GET /api/v1/training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls` answers
`{urls: {file: url}, expires}` for an external weights checkpoint the caller can read (its own, or a published
one): presigned GET URLs for a checkpoint in S3, else signed links to `GET /api/v1/downloads/...`
(`api/download_links.py`), all valid for `LOOM_DOWNLOAD_URL_SECONDS`. As in Tinker, only external weights
have URLs: a training checkpoint is downloaded by exporting it with `save_weights_external` first (what
`tinker checkpoint download tinker://.../weights/...` does), and sampler weights are not downloadable.

Handing out the URLs is a `checkpoint_read` (purpose `download`) in the checkpoint owner's audit log, under the
caller's name; the downloads themselves are not audited (the link is the credential, see the request log).

The download route needs no API key (the link is the credential): 403 for a missing, wrong or expired signature;
404 once the checkpoint is deleted, expired or saved again; otherwise the file, verified against the checkpoint's
manifest, streamed with its Content-Length (and HTTP range support).

Limits: links name the files the manifest lists, nothing else (no path can reach outside the checkpoint's folder);
the base of the links is `LOOM_PUBLIC_URL`, or the scheme and host the URL request came in on.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from api.db.audit import ReadPurpose, checkpoint_read
from api.db.models import Checkpoint
from api.deps import State, Tenant
from api.download_links import external_file_resource, signed_url, signer_for, storage_version
from api.errors import APIError, ErrorCode, invalid, not_found
from api.paths import TinkerPath, is_live, readable_checkpoint
from contract.checkpoint_store import LocalCheckpointStore
from loom.types import ExternalWeightsUrlsResponse

router = APIRouter(prefix="/api/v1")

EXTERNAL = "external_weights"
EXPIRES = re.compile(r"[0-9]{1,12}")
"""A link's expiry: unix seconds (ASCII digits only, so never a number `int` cannot read)."""


def _file_urls(request: Request, state: State, path: TinkerPath, uri: str, expires: int) -> dict[str, str]:
    if uri.startswith("s3://"):
        from contract.checkpoint_s3 import presigned_file_urls

        return presigned_file_urls(uri, state.settings.download_url_seconds)
    signer, base = signer_for(state.settings), state.settings.public_url or str(request.base_url)
    version = storage_version(uri)
    return {
        file_name: signed_url(signer, base, external_file_resource(path.run_id, path.name, version, file_name), expires)
        for file_name in LocalCheckpointStore.files(uri)
    }


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    run_id: str, kind: str, name: str, request: Request, state: State, owner: Tenant
) -> dict[str, Any]:
    if kind != EXTERNAL:
        raise invalid(
            f"only external weights checkpoints (tinker://<run>/{EXTERNAL}/<name>) have download URLs; export this "
            "one with save_weights_external (sampler weights cannot be downloaded)",
            "checkpoint_id",
        )
    path = TinkerPath(run_id, kind, name)
    with state.transaction() as session:
        checkpoint = readable_checkpoint(session, owner, path)
        checkpoint_read(session, checkpoint, owner, ReadPurpose.DOWNLOAD)
        uri = checkpoint.storage_uri
    expires = int(time.time()) + state.settings.download_url_seconds
    urls = _file_urls(request, state, path, uri, expires)
    return ExternalWeightsUrlsResponse(urls=urls, expires=datetime.fromtimestamp(expires, UTC)).to_wire()


@router.get("/downloads/{run_id}/" + EXTERNAL + "/{name}/{version}/{file_name}")
def download_external_file(
    run_id: str, name: str, version: str, file_name: str, state: State, expires: str = "", signature: str = ""
) -> FileResponse:
    resource = external_file_resource(run_id, name, version, file_name)
    well_formed = EXPIRES.fullmatch(expires) is not None
    valid = well_formed and signer_for(state.settings).verify(resource, int(expires), signature, time.time())
    if not valid:
        raise APIError(
            403,
            ErrorCode.FORBIDDEN,
            "this download link is invalid or has expired; ask get_external_weights_urls for a new one",
        )
    with state.reading() as session:
        checkpoint = session.scalar(
            select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.checkpoint_id == f"{EXTERNAL}/{name}")
        )
        gone = checkpoint is None or not is_live(checkpoint) or storage_version(checkpoint.storage_uri) != version
    if gone:
        raise not_found(f"checkpoint tinker://{run_id}/{EXTERNAL}/{name} no longer exists as this link saw it")
    try:
        path = LocalCheckpointStore.verified_file(checkpoint.storage_uri, file_name)
    except KeyError:
        raise not_found(f"checkpoint tinker://{run_id}/{EXTERNAL}/{name} has no file {file_name!r}") from None
    return FileResponse(path, media_type="application/octet-stream", filename=file_name)
