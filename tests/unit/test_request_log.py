"""The operator's request logs (`api/request_log.py`, `api/middleware.py::RequestLog`), in-process through the real
app (`LOOM_QUEUE=external`): every request leaves one `loom.access` record with its request id, tenant (the key's
owner, `-` without a valid key), route template, raw path, status, latency, bytes, client and user agent; every
4xx/5xx also leaves one `loom.errors` record with the error code and the reason the client was given (an exception:
with its traceback); no API key ever appears in a record; and `configure_request_logs` writes them as JSON lines.
(tests/e2e/test_request_logs.py checks what a real `loom serve` prints.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.request_log import JsonLines, access_log, configure_request_logs, errors_log
from contract.settings import Settings

BASE = "tiny-kimi-k2"
AGENT = "log-test-agent/1.0"


@pytest.fixture
def app_and_keys(tmp_path: Path):
    state = build_state(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))
    with state.transaction() as session:
        _, alice = create_api_key(session, "alice", "test")
        _, mallory = create_api_key(session, "mallory", "test")
    app = create_app(state=state)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    return app, alice, mallory


def records(caplog: pytest.LogCaptureFixture, request_id: str) -> tuple[dict, dict | None]:
    """The access fields and the error record (or None) of one request."""
    access = [r.fields for r in caplog.records if r.name == "loom.access" and r.fields["request_id"] == request_id]
    errors = [r for r in caplog.records if r.name == "loom.errors" and r.fields["request_id"] == request_id]
    assert len(access) == 1 and len(errors) <= 1, (access, errors)
    return access[0], (errors[0] if errors else None)


def test_each_request_is_logged_with_its_tenant_route_status_and_reason(app_and_keys, caplog) -> None:
    app, alice, mallory = app_and_keys
    client = TestClient(app)
    as_alice = {"X-API-Key": alice}
    session_id = client.post("/api/v1/create_session", json={}, headers=as_alice).json()["session_id"]
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}}
    run_id = client.post("/api/v1/create_model", json=body, headers=as_alice).json()["model_id"]

    cases = {
        "req-ok": ("GET", f"/api/v1/training_runs/{run_id}", as_alice, None),
        "req-bad-body": ("POST", "/api/v1/create_session", as_alice, {"tags": 5}),
        "req-no-route": ("GET", "/api/v1/no_such_route", as_alice, None),
        "req-not-yours": ("GET", f"/api/v1/training_runs/{run_id}", {"X-API-Key": mallory}, None),
        "req-bad-key": ("GET", "/api/v1/training_runs", {"Authorization": "Bearer not-a-key"}, None),
    }
    answers = {}
    with caplog.at_level(logging.INFO):
        for request_id, (method, path, headers, json_body) in cases.items():
            headers = {**headers, "X-Request-Id": request_id, "User-Agent": AGENT}
            response = client.request(method, path, json=json_body, headers=headers)
            answers[request_id] = response

    ok, no_error = records(caplog, "req-ok")
    assert no_error is None
    assert ok == {
        "request_id": "req-ok",
        "tenant": "alice",
        "method": "GET",
        "route": "/api/v1/training_runs/{run_id}",
        "path": f"/api/v1/training_runs/{run_id}",
        "status": 200,
        "ms": ok["ms"],
        "request_bytes": 0,
        "response_bytes": len(answers["req-ok"].content),
        "client": "testclient:50000",
        "user_agent": AGENT,
    }
    assert ok["ms"] >= 0

    expected = {
        "req-bad-body": ("alice", "/api/v1/create_session", 400, "invalid_request"),
        "req-no-route": ("-", "-", 404, "not_found"),
        "req-not-yours": ("mallory", "/api/v1/training_runs/{run_id}", 404, "not_found"),
        "req-bad-key": ("-", "/api/v1/training_runs", 401, "unauthenticated"),
    }
    for request_id, (tenant, route, status, code) in expected.items():
        access, error = records(caplog, request_id)
        sent = answers[request_id].json()["error"]
        assert answers[request_id].status_code == status
        assert (access["tenant"], access["route"], access["status"]) == (tenant, route, status)
        assert error is not None and error.levelno == logging.WARNING
        assert error.fields == {
            **{k: access[k] for k in ("request_id", "tenant", "method", "route", "path", "status")},
            "code": code,
            "reason": sent["message"],
        }
    assert records(caplog, "req-bad-body")[0]["request_bytes"] == len(b'{"tags":5}')
    assert "tags" in records(caplog, "req-bad-body")[1].fields["reason"]
    assert run_id in records(caplog, "req-not-yours")[1].fields["reason"]

    formatter = JsonLines()
    for record in caplog.records:
        for text in (record.getMessage(), formatter.format(record)):
            assert alice not in text and mallory not in text and "not-a-key" not in text


def test_an_unhandled_exception_is_a_500_logged_with_its_traceback(app_and_keys, caplog) -> None:
    app, alice, _ = app_and_keys
    with caplog.at_level(logging.INFO):
        response = TestClient(app).get("/boom", headers={"X-Request-Id": "req-boom", "X-API-Key": alice})
    assert response.status_code == 500
    access, error = records(caplog, "req-boom")
    assert access["status"] == 500 and access["route"] == "/boom"
    assert error is not None and error.levelno == logging.ERROR
    assert error.fields["code"] == "internal_error"
    assert "RuntimeError: a bug" in JsonLines().format(error)


@pytest.fixture
def configured_logs(tmp_path: Path):
    path = tmp_path / "logs" / "access.log"
    configure_request_logs(path)
    yield path
    for logger in (access_log, errors_log):
        for handler in logger.handlers:
            handler.close()
        logger.handlers = []
        logger.propagate = True


def test_configured_logs_are_json_lines_in_the_file(app_and_keys, configured_logs: Path) -> None:
    app, alice, _ = app_and_keys
    client = TestClient(app)
    client.get("/api/v1/healthz", headers={"X-Request-Id": "req-file-ok"})
    client.get("/api/v1/training_runs/nope", headers={"X-Request-Id": "req-file-404", "X-API-Key": alice})
    lines = [json.loads(line) for line in configured_logs.read_text().splitlines()]
    assert [(line["logger"], line["request_id"], line["status"]) for line in lines] == [
        ("loom.access", "req-file-ok", 200),
        ("loom.access", "req-file-404", 404),
        ("loom.errors", "req-file-404", 404),
    ]
    assert lines[0]["level"] == "info" and lines[2]["level"] == "warning" and lines[1]["tenant"] == "alice"
    assert lines[2]["reason"] == "training run 'nope' not found" and "ts" in lines[0]
    assert alice not in configured_logs.read_text()
