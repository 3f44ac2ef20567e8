"""A database that cannot serve answers 503 + Retry-After with the machine-readable body (never a 500); `/readyz`
reports it, `/api/v1/healthz` does not look. The real PostgreSQL pause is tests/integration/test_db_outage.py."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from api.app import build_state, create_app
from api.deps import AppState
from api.errors import install_error_handlers
from contract.settings import Settings

DOWN = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


@pytest.mark.parametrize(
    "error",
    [DOWN, PoolTimeoutError("QueuePool limit reached"), OperationalError("x", {}, Exception("y"), True)],
    ids=["operational", "pool-timeout", "invalidated"],
)
def test_database_errors_answer_503_with_retry_after(error: Exception) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    response = TestClient(app).get("/boom")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"] == {
        "code": "service_unavailable",
        "message": "the database is temporarily unavailable; retry shortly",
        "param": None,
        "type": "service_unavailable_error",
        "request_id": None,  # a bare app: no RequestId middleware around it
    }


def test_other_database_errors_stay_500() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    def bug() -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    assert TestClient(app, raise_server_exceptions=False).get("/bug").status_code == 500


def test_readyz_follows_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path))
    state = build_state(Settings(base_models=["tiny-kimi-k2"], queue="external"))
    client = TestClient(create_app(state=state))
    assert client.get("/readyz").json() == {"status": "ready"}

    @contextmanager
    def down():
        raise DOWN
        yield

    monkeypatch.setattr(AppState, "reading", lambda self: down())
    response = client.get("/readyz")
    assert response.status_code == 503 and "retry-after" in response.headers
    assert response.json()["error"]["code"] == "service_unavailable"
    assert client.get("/api/v1/healthz").status_code == 200  # liveness never asks the database
