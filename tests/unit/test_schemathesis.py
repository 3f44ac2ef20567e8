"""Schemathesis over the whole published API: no server error, and every error in the JSON error shape.

Every operation of `/openapi.json` gets schema-valid (positive) and schema-violating (negative) requests, generated
from the published request schemas (the raw-body forward_backward/forward included) and sent in-process to the real
app with a real API key (`LOOM_QUEUE=external`: no model loads). Each answer must be below 500, and every 4xx must
carry `{"error": {"code", "message", "param", "type", "request_id"}, "detail"}` with the request id of its
`x-request-id` header.

Limits: a bounded, derandomized run (`EXAMPLES` per operation and mode) so it is deterministic and fits CI; no
stateful sequences (random ids mostly reach the not-found paths of operations that need an existing run);
operations with nothing to make invalid (no parameters, no body) have no negative cases.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.app import build_state, create_app
from api.db.keys import create_api_key
from contract.settings import Settings

EXAMPLES = 6
"""Examples per operation and generation mode."""

ERROR_KEYS = {"code", "message", "param", "type", "request_id"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    settings_ = Settings(
        data_dir=tmp_path_factory.mktemp("schemathesis"), base_models=["tiny-kimi-k2"], queue="external"
    )
    state = build_state(settings_)
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "schemathesis")
    app = create_app(state=state)
    return schemathesis.openapi.from_asgi("/openapi.json", app), key


def check_answer(case, response) -> None:
    where = f"{case.operation.label} ({case.method} {case.formatted_path})"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.content[:500]!r}"
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    assert set(body) == {"error", "detail"} and set(body["error"]) == ERROR_KEYS, f"{where}: {body}"
    assert body["error"]["request_id"] == response.headers["x-request-id"][0], where


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_anywhere(api, mode: GenerationMode) -> None:
    schema, key = api
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    exercised = 0
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def exercise(case) -> None:
            check_answer(case, case.call(headers={"X-API-Key": key}))

        try:
            exercise()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing of it can be made invalid
            continue
        exercised += 1
    assert exercised >= len(operations) // 2
