"""No tenant sees another's runs, futures or checkpoints; each run's requests execute in seq order; a duplicate
seq_id replays the stored result instead of applying a step twice."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.wire import datum, error_of, fb_body, new_run, new_session, result

pytestmark = pytest.mark.e2e

TOKENS = [5, 6, 7, 8, 9]


@pytest.fixture
def mallory(server, other_tenant_key):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": other_tenant_key}, timeout=60) as client:
        yield client


def test_other_tenant_gets_404_everywhere(http, mallory) -> None:
    run_id = new_run(http)
    fb = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(TOKENS)])).json()
    result(http, fb["request_id"])
    save = http.post("/api/v1/save_weights", json={"model_id": run_id, "seq_id": 2, "path": "secret"}).json()
    path = result(http, save["request_id"])["path"]

    attempts = [
        mallory.post("/api/v1/get_info", json={"model_id": run_id}),
        mallory.post("/api/v1/forward_backward", json=fb_body(run_id, 3, [datum(TOKENS)])),
        mallory.post("/api/v1/optim_step", json={"model_id": run_id, "seq_id": 3, "adam_params": {}}),
        mallory.post("/api/v1/retrieve_future", json={"request_id": fb["request_id"]}),
        mallory.post("/api/v1/weights_info", json={"tinker_path": path}),
        mallory.get(f"/api/v1/training_runs/{run_id}"),
        mallory.get(f"/api/v1/training_runs/{run_id}/checkpoints"),
        mallory.post(
            "/api/v1/load_weights",
            json={"session_id": new_session(mallory), "model_seq_id": 0, "path": path, "optimizer": True},
        ),
        mallory.post(
            "/api/v1/create_sampling_session",
            json={"session_id": new_session(mallory), "sampling_session_seq_id": 0, "model_path": path},
        ),
        mallory.post(
            "/api/v1/create_model",
            json={
                "session_id": run_id.split(":")[0],
                "model_seq_id": 5,
                "base_model": "loom/tiny-kimi-k2",
                "lora_config": {"rank": 2},
            },
        ),
    ]
    for response in attempts:
        assert response.status_code == 404, (response.request.url, response.text)
        assert error_of(response)["code"] == "not_found"
    assert run_id not in [r["training_run_id"] for r in mallory.get("/api/v1/training_runs").json()["training_runs"]]
    # The owner still sees all of it.
    assert http.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 200


def test_requests_run_in_seq_order_even_when_submitted_out_of_order(http) -> None:
    run_id = new_run(http)
    # seq 3 (a forward pass) and seq 2 (an optimizer step) arrive before seq 1 (the gradient).
    fwd = http.post(
        "/api/v1/forward_backward", json=fb_body(run_id, 3, [datum(TOKENS)]) | {"forward_only": True}
    ).json()
    opt = http.post(
        "/api/v1/optim_step", json={"model_id": run_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
    ).json()
    http.post("/api/v1/retrieve_future", json={"request_id": fwd["request_id"]}, timeout=60)
    grad = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(TOKENS)])).json()
    before = result(http, grad["request_id"])["metrics"]["loss:sum"]
    assert result(http, opt["request_id"])["metrics"]["grad_norm:mean"] > 0  # the step saw seq 1's gradient
    after = result(http, fwd["request_id"])["metrics"]["loss:sum"]
    assert after < before  # the forward pass ran after the step


def test_duplicate_seq_id_replays_instead_of_stepping_twice(http) -> None:
    run_id = new_run(http)
    grad = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(TOKENS)])).json()
    step_body = {"model_id": run_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
    first = http.post("/api/v1/optim_step", json=step_body).json()
    first_result = result(http, first["request_id"])
    again = http.post("/api/v1/optim_step", json=step_body).json()
    assert again["request_id"] == first["request_id"]
    assert result(http, again["request_id"]) == first_result
    probe = http.post(
        "/api/v1/forward_backward", json=fb_body(run_id, 3, [datum(TOKENS)]) | {"forward_only": True}
    ).json()
    replayed_grad = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(TOKENS)])).json()
    assert replayed_grad["request_id"] == grad["request_id"]
    # Different content under a used seq_id is a conflict, not a silent overwrite.
    conflict = http.post("/api/v1/optim_step", json=step_body | {"adam_params": {"learning_rate": 0.5}})
    assert conflict.status_code == 409 and error_of(conflict)["code"] == "conflict"
    assert result(http, probe["request_id"])["metrics"]["loss:sum"] > 0


def test_results_stay_retrievable_after_an_abandoned_poll(http, server) -> None:
    run_id = new_run(http)
    fb = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(TOKENS)])).json()
    with pytest.raises(httpx.ReadTimeout):
        http.post("/api/v1/retrieve_future", json={"request_id": fb["request_id"]}, timeout=0.001)
    assert result(http, fb["request_id"]) == result(http, fb["request_id"])
