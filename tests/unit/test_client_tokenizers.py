"""Loom's SDK loads the server's tokenizer from the server (`loom.tokenizers`), never from a hub: the training and
sampling clients' `get_tokenizer()` download the listed files once per revision into the local cache, check each
against its SHA-256, and load the cached folder; a file that does not match is refused and nothing is cached.
Driven against the SDK tests' in-process fake server (tests/unit/test_client_sdk.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import loom
from tests.unit.test_client_sdk import FAST, FakeServer


def tiny_tokenizer_files() -> dict[str, bytes]:
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def serve_tokenizer(server: FakeServer, model: str, files: dict[str, bytes], revision: str, served=None) -> None:
    """Answer the listing of `model` with `files`, and its file routes with `served` (default: the same files)."""
    listing = {
        "base_model": model,
        "revision": revision,
        "files": [
            {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        ],
    }
    server.hooks[f"/api/v1/tokenizers/{model}"] = lambda request, body: httpx.Response(200, json=listing)
    for name, data in (served or files).items():
        server.hooks[f"/api/v1/tokenizers/{model}/files/{name}"] = lambda r, b, data=data: httpx.Response(
            200, content=data
        )


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LOOM_TOKENIZER_CACHE", str(tmp_path / "cache"))
    server = FakeServer()
    client = loom.ServiceClient(
        base_url="http://loom.test", api_key="tml-test", transport=httpx.MockTransport(server), retry=FAST
    )
    yield client, server
    client.close()


def test_get_tokenizer_downloads_once_per_revision_and_loads_the_cached_folder(service, tmp_path: Path) -> None:
    client, server = service
    files = tiny_tokenizer_files()
    serve_tokenizer(server, "tok/x", files, "a" * 40)  # the fake server's get_info names tokenizer_id "tok/x"
    serve_tokenizer(server, "tiny", files, "a" * 40)
    tokenizer = client.create_lora_training_client("tiny").get_tokenizer()
    assert tokenizer.encode("hello world", add_special_tokens=False) == [1, 2]
    cached = tmp_path / "cache" / ("a" * 40)
    assert {p.name: p.read_bytes() for p in cached.iterdir()} == files
    file_gets = [r for r in server.requests if "/files/" in r.url.path]
    assert len(file_gets) == 2 and all(r.headers["X-API-Key"] == "tml-test" for r in file_gets)

    sampler = client.create_sampling_client(base_model="tiny")
    assert sampler.get_tokenizer().encode("world hello", add_special_tokens=False) == [2, 1]
    assert len([r for r in server.requests if "/files/" in r.url.path]) == 2  # the same revision: from the cache
    assert server.calls("/api/v1/tokenizers/tiny")  # the listing is asked for every time


def test_a_file_that_does_not_match_its_digest_is_refused(service, tmp_path: Path) -> None:
    client, server = service
    files = tiny_tokenizer_files()
    serve_tokenizer(server, "tiny", files, "b" * 40, served={**files, "tokenizer.json": b"{}"})
    sampler = client.create_sampling_client(base_model="tiny")
    with pytest.raises(loom.LoomError, match="does not match its SHA-256"):
        sampler.get_tokenizer()
    assert not (tmp_path / "cache" / ("b" * 40)).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no download left behind
