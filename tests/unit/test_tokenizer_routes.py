"""The tokenizer routes, in-process through the real app (`LOOM_QUEUE=external`: nothing loads a model; the test
publishes a tokenizer folder as a worker would): Loom's listing and files, and the Hugging Face Hub subset under
`/hf` with the headers `huggingface_hub` reads (`X-Repo-Commit`, `ETag`, `Content-Length`, `X-Error-Code`).
`get_info` names the model's public id as `tokenizer_id`. None of these routes needs an API key, and a Hugging
Face token sent to them is ignored. (tests/e2e/test_tokenizers.py drives them with huggingface_hub itself.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.db.keys import create_api_key
from contract.catalogue import TINY_KIMI_K2
from contract.published_tokenizers import publish_tokenizer
from contract.settings import Settings

FILES = {
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
    "tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
    "tiktoken.model": b"IQ== 0\n",
}
KIMI = TINY_KIMI_K2.name


@pytest.fixture
def api(tmp_path: Path):
    state = build_state(Settings(data_dir=tmp_path, base_models=[KIMI], queue="external"))
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    return TestClient(create_app(state=state)), state, key


def publish(state, tmp_path: Path, files: dict[str, bytes] = FILES) -> str:
    folder = tmp_path / "export"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return publish_tokenizer(state.store, TINY_KIMI_K2, folder)


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


def test_before_any_worker_published_it_the_tokenizer_is_a_503_to_retry(api) -> None:
    client, _, _ = api
    response = client.get(f"/api/v1/tokenizers/{KIMI}")
    assert "no worker serving it has published it" in error(response, 503, "service_unavailable")["message"]
    assert response.headers["retry-after"]
    assert client.head(f"/hf/{KIMI}/resolve/main/tokenizer.json").status_code == 503


def test_loom_listing_and_files(api, tmp_path: Path) -> None:
    client, _, _ = api
    revision = publish(api[1], tmp_path)
    for name in (KIMI, "tiny-kimi-k2"):  # the id or an alias
        listing = client.get(f"/api/v1/tokenizers/{name}").json()
        assert listing["base_model"] == KIMI and listing["revision"] == revision
        assert {f["name"]: (f["size"], f["sha256"]) for f in listing["files"]} == {
            name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in FILES.items()
        }
    for name, data in FILES.items():
        got = client.get(f"/api/v1/tokenizers/{KIMI}/files/{name}")
        assert got.content == data and got.headers["content-length"] == str(len(data))
        assert got.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        head = client.head(f"/api/v1/tokenizers/{KIMI}/files/{name}")
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == got.headers["etag"]
    ranged = client.get(f"/api/v1/tokenizers/{KIMI}/files/tokenizer.json", headers={"Range": "bytes=0-3"})
    assert ranged.status_code == 206 and ranged.content == FILES["tokenizer.json"][:4]
    error(client.get(f"/api/v1/tokenizers/{KIMI}/files/config.json"), 404, "not_found")
    error(client.get(f"/api/v1/tokenizers/{KIMI}/files/manifest.json"), 404, "not_found")  # the store's, not served
    assert client.get(f"/api/v1/tokenizers/{KIMI}/files/..%2F..%2Fapi_key").status_code == 404
    error(client.get("/api/v1/tokenizers/acme/unknown"), 404, "model_not_found")


def test_hub_routes_answer_what_huggingface_hub_reads(api, tmp_path: Path) -> None:
    client, _, _ = api
    revision = publish(api[1], tmp_path)
    for path in (f"/hf/api/models/{KIMI}", "/hf/api/models/tiny-kimi-k2/revision/main"):
        info = client.get(path).json()
        assert info["id"] == KIMI and info["sha"] == revision and info["tags"] == []
        assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(FILES)
    tree = client.get(f"/hf/api/models/{KIMI}/tree/{revision}", params={"recursive": True}).json()
    by_path = {entry["path"]: entry for entry in tree}
    assert sorted(by_path) == sorted(FILES) and all(e["type"] == "file" for e in tree)
    data = FILES["tokenizer.json"]
    sha = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    assert by_path["tokenizer.json"]["lfs"] == {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
    assert by_path["tokenizer.json"]["oid"] == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()

    # Any revision asked for is answered with the current one, which X-Repo-Commit names.
    for asked in ("main", "612681931a8c906ddb349f8ad0f582cb552189cd"):
        head = client.head(f"/hf/{KIMI}/resolve/{asked}/tokenizer.json")
        assert head.status_code == 200
        assert head.headers["x-repo-commit"] == revision and head.headers["etag"] == f'"{sha}"'
        assert head.headers["content-length"] == str(len(data))
        assert client.get(f"/hf/{KIMI}/resolve/{asked}/tokenizer.json").content == data

    missing = client.head(f"/hf/{KIMI}/resolve/main/config.json")
    assert missing.status_code == 404
    assert missing.headers["x-error-code"] == "EntryNotFound" and missing.headers["x-repo-commit"] == revision
    templates = client.get(f"/hf/api/models/{KIMI}/tree/main/additional_chat_templates")
    assert error(templates, 404, "not_found") and templates.headers["x-error-code"] == "EntryNotFound"
    for path in ("/hf/acme/unknown/resolve/main/tokenizer.json", "/hf/api/models/acme/unknown"):
        unknown = client.get(path)
        assert error(unknown, 404, "model_not_found") and unknown.headers["x-error-code"] == "RepoNotFound"


def test_no_key_is_needed_and_a_hugging_face_token_is_ignored(api, tmp_path: Path) -> None:
    client, _, _ = api
    publish(api[1], tmp_path)
    for headers in ({}, {"Authorization": "Bearer hf_not_a_loom_key"}, {"X-API-Key": "revoked"}):
        assert client.get(f"/api/v1/tokenizers/{KIMI}", headers=headers).status_code == 200
        assert client.head(f"/hf/{KIMI}/resolve/main/tokenizer.json", headers=headers).status_code == 200


def test_get_info_names_the_public_model_id(api) -> None:
    client, _, key = api
    client.headers["X-API-Key"] = key
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": "tiny-kimi-k2", "lora_config": {"rank": 4}}
    assert client.post("/api/v1/create_model", json=body).status_code == 200
    info = client.post("/api/v1/get_info", json={"model_id": f"{session_id}:train:0"}).json()
    assert info["model_data"]["tokenizer_id"] == KIMI == info["model_data"]["model_name"]
