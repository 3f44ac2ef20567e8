"""A published tokenizer on an S3 checkpoint store (`moto_server` on a free port): a worker's publication is read
back verified by the API, which serves its files with the same digests it lists; an unchanged republication writes
nothing; and `folder_uri` names where `write` put it, so `loom gc` can keep it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from contract.catalogue import TINY_KIMI_K2
from contract.checkpoint_store import configured_checkpoint_store
from contract.published_tokenizers import PUBLISHED_FOLDER, TOKENIZERS_OWNER, publish_tokenizer, tokenizer_uri
from contract.settings import Settings

pytestmark = pytest.mark.integration

FILES = {"tokenizer.json": b'{"model": {"type": "BPE"}}', "tiktoken.model": b"IQ== 0\n"}


def test_a_tokenizer_published_to_s3_is_served_by_the_api(bucket: str, s3, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        base_models=[TINY_KIMI_K2.name],
        queue="external",
        checkpoint_url=f"s3://{bucket}/ckpt",
        checkpoint_cache_dir=tmp_path / "api-cache",
    )
    state = build_state(settings)
    store = configured_checkpoint_store(settings.model_copy(update={"checkpoint_cache_dir": tmp_path / "worker-cache"}))
    export = tmp_path / "export"
    export.mkdir()
    for name, data in FILES.items():
        (export / name).write_bytes(data)
    revision = publish_tokenizer(store, TINY_KIMI_K2, export)
    keys_after_first = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert publish_tokenizer(store, TINY_KIMI_K2, export) == revision
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == keys_after_first  # nothing rewritten
    uri = tokenizer_uri(store, TINY_KIMI_K2)
    assert uri == f"s3://{bucket}/ckpt/{TOKENIZERS_OWNER}/{TINY_KIMI_K2.cache_name}/{PUBLISHED_FOLDER}"
    assert f"ckpt/{TOKENIZERS_OWNER}/{TINY_KIMI_K2.cache_name}/{PUBLISHED_FOLDER}/manifest.json" in keys_after_first

    client = TestClient(create_app(state=state))
    listing = client.get(f"/api/v1/tokenizers/{TINY_KIMI_K2.name}").json()
    assert listing["revision"] == revision
    for file in listing["files"]:
        got = client.get(f"/hf/{TINY_KIMI_K2.name}/resolve/main/{file['name']}")
        assert got.content == FILES[file["name"]]
        assert got.headers["etag"] == f'"{hashlib.sha256(got.content).hexdigest()}"' == f'"{file["sha256"]}"'
        assert got.headers["x-repo-commit"] == revision
