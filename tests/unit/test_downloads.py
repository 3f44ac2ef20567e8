"""Downloads of external weights, in-process through the real app (`LOOM_QUEUE=external`: no model is loaded).

- `UrlSigner`: a link verifies only with its own resource, expiry and signature, only before it expires, and a
  wrong signature of any length or alphabet is just a refusal; the key made for a data dir is kept (mode 0600) and
  reused, and `LOOM_DOWNLOAD_URL_SECRET` takes precedence.
- `LocalCheckpointStore.verified_file` serves only files its manifest lists (no `../`, no manifest) and refuses a
  file whose bytes changed.
- `save_weights_external` at the door: bad names, bad or too many age recipients, a name already taken → 4xx.
- `external_weights_urls` answers one signed link per stored file (not the manifest) that downloads the file's bytes
  with its Content-Length and no API key; another tenant gets 404, a sampler checkpoint 400.
- The download route answers 403 for a tampered, missing or expired signature, 404 for a validly signed path the
  manifest does not list (traversal), and 404 once the checkpoint is deleted, expired, or saved again.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.db.models import Checkpoint, CheckpointKind
from api.db.types import utcnow
from api.download_links import (
    SECRET_FILE,
    UrlSigner,
    _signer,
    external_file_resource,
    signed_url,
    signer_for,
    storage_version,
)
from contract.checkpoint_store import CheckpointCorrupt, LocalCheckpointStore
from contract.settings import Settings
from tests.unit.api_fixtures import commit_checkpoint

BASE = "tiny-kimi-k2"
FILES = {"adapter_model.safetensors": os.urandom(3000), "adapter_config.json": b'{"r": 4}'}
AGE_KEY = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"  # the age spec's example recipient


# -- signer --------------------------------------------------------------------------------------------------------


def test_a_signature_holds_only_for_its_resource_and_expiry_and_before_it() -> None:
    signer = UrlSigner(b"k" * 32)
    signature = signer.sign("run/external_weights/a/v/f", 1000)
    assert signer.verify("run/external_weights/a/v/f", 1000, signature, now=999.0)
    assert not signer.verify("run/external_weights/a/v/f", 1000, signature, now=1000.0)  # expired
    assert not signer.verify("run/external_weights/a/v/g", 1000, signature, now=0.0)  # another file
    assert not signer.verify("run/external_weights/a/v/f", 1001, signature, now=0.0)  # a longer life
    assert not UrlSigner(b"x" * 32).verify("run/external_weights/a/v/f", 1000, signature, now=0.0)  # another key
    for forged in ("", signature[:-1], signature.upper(), "é" * 64, signature + "0"):
        assert not signer.verify("run/external_weights/a/v/f", 1000, forged, now=0.0)


def test_the_key_is_made_once_per_data_dir_and_the_setting_overrides_it(tmp_path: Path) -> None:
    first = signer_for(Settings(data_dir=tmp_path / "a")).sign("r", 1)
    key_file = tmp_path / "a" / SECRET_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text()) == 64
    _signer.cache_clear()  # a restarted process reads the kept key
    assert signer_for(Settings(data_dir=tmp_path / "a")).sign("r", 1) == first
    assert signer_for(Settings(data_dir=tmp_path / "b")).sign("r", 1) != first
    chosen = Settings(data_dir=tmp_path / "c", download_url_secret=SecretStr("operator-chosen"))
    assert signer_for(chosen).sign("r", 1) == UrlSigner(b"operator-chosen").sign("r", 1)
    assert not (tmp_path / "c" / SECRET_FILE).exists()


def test_the_store_serves_only_files_its_manifest_lists_and_checks_their_bytes(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path / "store")
    uri, _ = store.write("alice", "s:train:0", "external_weights/x~1.1", _fill)
    folder = Path(uri.removeprefix("file://"))
    (tmp_path / "store" / "secret").write_bytes(b"not yours")
    assert LocalCheckpointStore.verified_file(uri, "adapter_config.json").read_bytes() == FILES["adapter_config.json"]
    for name in ("manifest.json", "../../../secret", "../x~1.1/adapter_config.json", "", "missing.bin"):
        with pytest.raises(KeyError):
            LocalCheckpointStore.verified_file(uri, name)
    (folder / "adapter_config.json").write_bytes(b'{"r": 5}')
    with pytest.raises(CheckpointCorrupt):
        LocalCheckpointStore.verified_file(uri, "adapter_config.json")


def _fill(folder: Path) -> None:
    for name, data in FILES.items():
        (folder / name).write_bytes(data)


# -- through the app -----------------------------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, base_models=[BASE], queue="external")
    state = build_state(settings)
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
        _, other = create_api_key(session, "mallory", "test")
    client = TestClient(create_app(state=state), headers={"X-API-Key": key})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    created = client.post(
        "/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}},
    )
    assert created.status_code == 200, created.text
    yield client, state, f"{session_id}:train:0", other


def _store_external(state, run_id: str, name: str, seq: int = 1, ttl_seconds: int | None = None) -> str:
    """An external checkpoint as a worker records it (files in the local store, a committed row)."""
    checkpoint_id = f"external_weights/{name}"
    store = LocalCheckpointStore(state.settings.checkpoint_dir)
    return commit_checkpoint(
        state.transaction,
        store,
        run_id,
        checkpoint_id,
        CheckpointKind.EXTERNAL,
        _fill,
        location=f"{checkpoint_id}~{seq}.1",
        ttl_seconds=ttl_seconds,
        overwrite=True,
    )


def _urls(client: TestClient, run_id: str, name: str, **headers) -> dict:
    response = client.get(
        f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls", headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def _plain_get(client: TestClient, url: str):
    """GET a link as a downloader does: no API key."""
    return client.get(url, headers={"X-API-Key": ""})


def test_save_weights_external_refuses_bad_input_at_the_door(app) -> None:
    client, state, run_id, _ = app

    def save(seq_id: int, **fields):
        return client.post("/api/v1/save_weights_external", json={"model_id": run_id, "seq_id": seq_id, **fields})

    for seq_id, fields, param in [
        (1, {"path": "../up"}, "path"),
        (2, {"path": "ok", "age_encryption_recipients": ["age1notakey"]}, "age_encryption_recipients"),
        (3, {"path": "ok", "age_encryption_recipients": ["pgp-key"]}, "age_encryption_recipients"),
        (4, {"path": "ok", "age_encryption_recipients": [AGE_KEY] * 11}, "age_encryption_recipients"),
        (5, {"path": "ok", "age_encryption_recipients": []}, "age_encryption_recipients"),
        (6, {"path": "ok", "ttl_seconds": 5}, "ttl_seconds"),
    ]:
        response = save(seq_id, **fields)
        assert response.status_code == 400, (fields, response.text)
        assert response.json()["error"]["param"] == param
    accepted = save(7, path="ok", age_encryption_recipients=[AGE_KEY], ttl_seconds=3600)
    assert accepted.status_code == 200 and accepted.json()["request_id"]
    _store_external(state, run_id, "taken")
    assert save(8, path="taken").status_code == 409


def test_signed_links_download_each_file_and_only_for_readers(app) -> None:
    client, state, run_id, other_key = app
    _store_external(state, run_id, "final")
    before = int(time.time())
    body = _urls(client, run_id, "final")
    lifetime = state.settings.download_url_seconds
    expires = int(datetime.fromisoformat(body["expires"]).timestamp())
    assert before + lifetime <= expires <= int(time.time()) + lifetime
    assert sorted(body["urls"]) == sorted(FILES)
    for name, url in body["urls"].items():
        assert url.startswith("http://testserver/api/v1/downloads/")
        response = _plain_get(client, url)
        assert response.status_code == 200, response.text
        assert response.content == FILES[name] and response.headers["content-length"] == str(len(FILES[name]))
        assert parse_qs(urlsplit(url).query)["expires"] == [str(expires)]
    mallory = client.get(
        f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/final/external_weights_urls",
        headers={"X-API-Key": other_key},
    )
    assert mallory.status_code == 404
    missing = client.get(f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/nope/external_weights_urls")
    assert missing.status_code == 404
    sampler = client.get(f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/final/external_weights_urls")
    assert sampler.status_code == 400 and sampler.json()["error"]["param"] == "checkpoint_id"


def test_links_with_bad_or_expired_signatures_are_403_and_traversal_is_404(app) -> None:
    client, state, run_id, _ = app
    uri = _store_external(state, run_id, "final")
    url = _urls(client, run_id, "final")["urls"]["adapter_config.json"]
    path, query = urlsplit(url).path, parse_qs(urlsplit(url).query)
    expires, signature = query["expires"][0], query["signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for forged in [
        f"{path}?expires={expires}&signature={flipped}",
        f"{path}?expires={int(expires) + 1}&signature={signature}",
        f"{path}?expires={expires}",
        f"{path}?expires=soon&signature={signature}",
        f"{path}?expires=%C2%B2&signature={signature}",  # a digit to str.isdigit, not to int
        f"{path}?expires={'9' * 5000}&signature={signature}",
        path,
        f"{path.replace('adapter_config.json', 'adapter_model.safetensors')}?expires={expires}&signature={signature}",
    ]:
        response = _plain_get(client, forged)
        assert response.status_code == 403, forged
        assert response.json()["error"]["code"] == "forbidden"
    signer, version = signer_for(state.settings), storage_version(uri)
    past = int(utcnow().timestamp()) - 1
    stale = signed_url(
        signer, "http://testserver", external_file_resource(run_id, "final", version, "adapter_config.json"), past
    )
    assert _plain_get(client, stale).status_code == 403
    future = int(utcnow().timestamp()) + 600

    def signed(name: str) -> str:
        return signed_url(signer, "http://testserver", external_file_resource(run_id, "final", version, name), future)

    assert _plain_get(client, signed("manifest.json")).status_code == 404  # validly signed, but not a listed file
    (state.settings.data_dir / "secret").write_bytes(b"not yours")
    for name in ("..", "../../../../secret", "%2e%2e%2fsecret"):
        response = _plain_get(client, signed(name))
        assert response.status_code in (403, 404) and b"not yours" not in response.content, name


def test_links_die_with_their_checkpoint(app) -> None:
    client, state, run_id, _ = app
    _store_external(state, run_id, "gone")
    url = _urls(client, run_id, "gone")["urls"]["adapter_config.json"]
    assert client.delete(f"/api/v1/training_runs/{run_id}/checkpoints/external_weights/gone").status_code == 200
    assert _plain_get(client, url).status_code == 404

    _store_external(state, run_id, "again", seq=1)
    old = _urls(client, run_id, "again")["urls"]["adapter_config.json"]
    _store_external(state, run_id, "again", seq=2)  # saved again under the same name: a new write
    assert _plain_get(client, old).status_code == 404
    assert _plain_get(client, _urls(client, run_id, "again")["urls"]["adapter_config.json"]).status_code == 200

    _store_external(state, run_id, "ttl", ttl_seconds=3600)
    url = _urls(client, run_id, "ttl")["urls"]["adapter_config.json"]
    with state.transaction() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.checkpoint_id == "external_weights/ttl"))
        row.expires_at = utcnow() - timedelta(seconds=1)
    assert _plain_get(client, url).status_code == 404
