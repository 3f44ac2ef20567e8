"""End-to-end fixtures: one shared real server per test session, plus helpers for raw HTTP and SDK clients."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server import LoomServer, create_key, free_port


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoomServer]:
    srv = LoomServer(tmp_path_factory.mktemp("loom-e2e"), free_port()).start()
    yield srv
    srv.stop()


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
