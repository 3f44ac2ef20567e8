"""External weights kept in S3 (a real `moto_server`) are downloaded through boto3 presigned URLs.

The app (`LOOM_QUEUE=external`, `LOOM_CHECKPOINT_URL=s3://...`) answers `external_weights_urls` for an external
checkpoint a worker committed to the bucket with one presigned GET URL per file, valid for
`LOOM_DOWNLOAD_URL_SECONDS` (SigV4); a plain HTTP client with no AWS credentials downloads each file's exact bytes
(with its Content-Length) from the S3 server. (moto does not check presigned signatures, so refusing a forged one
is left to S3.)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.db.models import CheckpointKind
from contract.checkpoint_store import open_checkpoint_store
from contract.settings import Settings
from tests.unit.api_fixtures import commit_checkpoint

pytestmark = pytest.mark.integration

BASE = "tiny-kimi-k2"
FILES = {"adapter_model.safetensors": os.urandom(200_000), "adapter_config.json": b'{"r": 4}'}


def _fill(folder: Path) -> None:
    for name, data in FILES.items():
        (folder / name).write_bytes(data)


def test_presigned_urls_download_the_adapter_from_s3(bucket, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        base_models=[BASE],
        queue="external",
        checkpoint_url=f"s3://{bucket}/ckpts",
        checkpoint_cache_dir=tmp_path / "cache",
        download_url_seconds=900,
    )
    state = build_state(settings)
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    client = TestClient(create_app(state=state), headers={"X-API-Key": key})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    run_id = f"{session_id}:train:0"
    created = client.post(
        "/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}},
    )
    assert created.status_code == 200, created.text

    store = open_checkpoint_store(settings.checkpoint_url, cache_dir=settings.checkpoint_cache_dir)
    commit_checkpoint(
        state.transaction,
        store,
        run_id,
        "external_weights/final",
        CheckpointKind.EXTERNAL,
        _fill,
        location="external_weights/final~1.1",
    )

    response = client.get(f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/final/external_weights_urls")
    assert response.status_code == 200, response.text
    urls = response.json()["urls"]
    assert sorted(urls) == sorted(FILES)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with httpx.Client(timeout=30) as plain:  # no AWS credentials: the signature in the URL is the only one
        for name, url in urls.items():
            assert url.startswith(f"{endpoint}/{bucket}/ckpts/") and "/attempts/" in url
            query = parse_qs(urlsplit(url).query)
            assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
            downloaded = plain.get(url)
            assert downloaded.status_code == 200, downloaded.text
            assert downloaded.content == FILES[name]
            assert downloaded.headers["content-length"] == str(len(FILES[name]))
