"""End-to-end fixtures: one shared real server per test session, plus helpers for raw HTTP and SDK clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import httpx
import pytest

from tests.e2e.hub_tokenizers import hub_tokenizer
from tests.e2e.server import LoomServer, create_key, free_port


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoomServer]:
    srv = LoomServer(tmp_path_factory.mktemp("loom-e2e"), free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session", autouse=True)
def loom_tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Loom's SDK caches the tokenizers it downloads in a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOM_TOKENIZER_CACHE", str(tmp_path_factory.mktemp("loom-tokenizers")))
        yield


@pytest.fixture(scope="session")
def other_tenant_key(server: LoomServer) -> str:
    """An API key of a second tenant ("mallory"), made with the real CLI against the server's database."""
    return create_key(server.data_dir, "mallory")


@pytest.fixture
def tinker_env(server: LoomServer, monkeypatch: pytest.MonkeyPatch) -> LoomServer:
    monkeypatch.setenv("TINKER_BASE_URL", server.url)
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    return server


@pytest.fixture
def http(server: LoomServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.api_key}, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def tokenizer_of(server: LoomServer, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """The shared server's tokenizer of a base model, through its Hugging Face Hub routes (`hub_tokenizer`)."""
    cache_dir = tmp_path_factory.mktemp("hf-cache")
    return cache(lambda model: hub_tokenizer(server.url, model, cache_dir))
