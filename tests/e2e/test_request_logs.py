"""What a real `loom serve` tells its operator, at its default log level: one JSON access line per request on its
stderr (and in `LOOM_ACCESS_LOG`) with the request id, tenant, route template, status, latency and bytes, and for a
400 (bad body), a 404 (unknown route, another tenant's run) and a 401 an error line with the reason the client got.
No API key appears in any of these lines."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.server import LoomServer
from tests.e2e.wire import new_run

pytestmark = pytest.mark.e2e


def json_lines(text: str) -> list[dict]:
    """The JSON lines of a log (the server's stderr also holds plain lines, e.g. its start-up messages)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_loom_serve_logs_each_request_and_each_refusal(server: LoomServer, other_tenant_key: str) -> None:
    key = server.api_key
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120) as http:
        run_id = new_run(http)
        cases = {
            "req-e2e-ok": http.build_request("GET", f"/api/v1/training_runs/{run_id}"),
            "req-e2e-bad-body": http.build_request("POST", "/api/v1/create_session", json={"tags": 5}),
            "req-e2e-no-route": http.build_request("GET", "/api/v1/no_such_route"),
            "req-e2e-not-yours": http.build_request(
                "GET", f"/api/v1/training_runs/{run_id}", headers={"X-API-Key": other_tenant_key}
            ),
            "req-e2e-bad-key": http.build_request("GET", "/api/v1/training_runs", headers={"X-API-Key": "tml-wrong"}),
        }
        answers = {}
        for request_id, request in cases.items():
            request.headers["X-Request-Id"] = request_id
            answers[request_id] = http.send(request)

    expected = {
        "req-e2e-ok": ("local", "/api/v1/training_runs/{run_id}", 200, None),
        "req-e2e-bad-body": ("local", "/api/v1/create_session", 400, "invalid_request"),
        "req-e2e-no-route": ("-", "-", 404, "not_found"),  # no route, so no key was checked
        "req-e2e-not-yours": ("mallory", "/api/v1/training_runs/{run_id}", 404, "not_found"),
        "req-e2e-bad-key": ("-", "/api/v1/training_runs", 401, "unauthenticated"),
    }
    stderr, file = server.log_path.read_text(), server.access_log_path.read_text()
    for source in (stderr, file):
        lines = json_lines(source)
        for request_id, (tenant, route, status, code) in expected.items():
            access = [line for line in lines if line["logger"] == "loom.access" and line["request_id"] == request_id]
            errors = [line for line in lines if line["logger"] == "loom.errors" and line["request_id"] == request_id]
            assert answers[request_id].status_code == status
            assert len(access) == 1, (request_id, access)
            line = access[0]
            assert (line["tenant"], line["route"], line["status"], line["method"]) == (
                tenant,
                route,
                status,
                cases[request_id].method,
            )
            assert line["path"] == cases[request_id].url.path and line["ms"] >= 0
            assert line["response_bytes"] == len(answers[request_id].content)
            assert line["user_agent"].startswith("python-httpx/") and line["client"].startswith("127.0.0.1:")
            if code is None:
                assert errors == []
            else:
                assert len(errors) == 1 and errors[0]["level"] == "warning"
                assert (errors[0]["code"], errors[0]["reason"]) == (
                    code,
                    answers[request_id].json()["error"]["message"],
                )
    logged = [line for line in stderr.splitlines() if line.startswith("{")] + file.splitlines()
    for secret in (key, other_tenant_key, "tml-wrong"):  # (`loom serve` prints its own key once, at start-up)
        assert not [line for line in logged if secret in line]
