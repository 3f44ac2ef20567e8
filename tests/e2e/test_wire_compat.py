"""Older and plainer clients: SDK <= 0.24 JSON bodies (nested `forward_backward_input`, `/forward`), JSON or
protobuf results chosen by `Accept`, and the discovery/inspection endpoints."""

from __future__ import annotations

import math

import pytest
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.e2e.wire import SMOL, datum, fb_body, new_run, new_session, result

pytestmark = pytest.mark.e2e

TOKENS = [10, 20, 30, 40, 50]


def test_legacy_json_forward_and_result_encodings(http) -> None:
    run_id = new_run(http)
    fwd = http.post(
        "/api/v1/forward",
        json={
            "model_id": run_id,
            "seq_id": 1,
            "forward_input": fb_body(run_id, 1, [datum(TOKENS)])["forward_backward_input"],
        },
    )
    assert fwd.status_code == 200, fwd.text
    as_json = result(http, fwd.json()["request_id"])
    logprobs = as_json["loss_fn_outputs"][0]["logprobs"]["data"]
    assert len(logprobs) == len(TOKENS) and all(lp < 0 for lp in logprobs)
    proto = http.post(
        "/api/v1/retrieve_future",
        json={"request_id": fwd.json()["request_id"]},
        headers={"Accept": "application/x-protobuf"},
    )
    assert proto.headers["content-type"].startswith("application/x-protobuf")
    decoded = deserialize_forward_backward_output(proto.content)
    assert decoded.metrics["loss:sum"] == pytest.approx(as_json["metrics"]["loss:sum"])
    assert decoded.loss_fn_outputs[0]["logprobs"].data == pytest.approx(logprobs)
    # forward_only passes leave no gradient behind: a step right after sees a zero gradient norm.
    step = http.post("/api/v1/optim_step", json={"model_id": run_id, "seq_id": 2, "adam_params": {}}).json()
    assert result(http, step["request_id"])["metrics"]["grad_norm:mean"] == 0.0


def test_discovery_and_inspection(http, server) -> None:
    caps = http.get("/api/v1/get_server_capabilities").json()
    names = [m["model_name"] for m in caps["supported_models"]]
    assert SMOL in names and "loom/tiny-kimi-k2" in names
    assert http.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).json()["proto_compress_fwdbwd"] is False
    assert http.post("/api/v1/telemetry", json={"events": []}).json() == {"status": "accepted"}
    run_id = new_run(http)
    info = http.post("/api/v1/get_info", json={"model_id": run_id}).json()
    assert info["model_id"] == run_id and info["model_data"]["tokenizer_id"] and info["lora_rank"] == 4
    session_id = run_id.split(":")[0]
    assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 200
    save = http.post("/api/v1/save_weights_for_sampler", json={"model_id": run_id, "seq_id": 1, "path": "s1"}).json()
    path = result(http, save["request_id"])["path"]
    sampler = http.post(
        "/api/v1/create_sampling_session",
        json={"session_id": new_session(http), "sampling_session_seq_id": 0, "model_path": path},
    ).json()["sampling_session_id"]
    got = http.get(f"/api/v1/samplers/{sampler}").json()
    assert got == {"sampler_id": sampler, "base_model": SMOL, "model_path": path}
    weights = http.post("/api/v1/weights_info", json={"tinker_path": path}).json()
    assert weights["base_model"] == SMOL and weights["lora_rank"] == 4 and weights["is_lora"] is True
    listed = http.get(f"/api/v1/training_runs/{run_id}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in listed] == [path]
    assert http.delete(f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/s1").status_code == 200
    assert http.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404


def test_non_finite_results_are_returned_instead_of_failing(http) -> None:
    run_id = new_run(http)
    # Finite float32 weights whose weighted loss overflows: the result holds inf (or NaN), and must still arrive.
    huge = datum(TOKENS, weights=[3e38] * len(TOKENS))
    probe = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [huge]) | {"forward_only": True})
    loss = result(http, probe.json()["request_id"])["metrics"]["loss:sum"]
    assert math.isnan(loss) or math.isinf(loss)
    proto = http.post(
        "/api/v1/retrieve_future",
        json={"request_id": probe.json()["request_id"]},
        headers={"Accept": "application/x-protobuf"},
    )
    decoded = deserialize_forward_backward_output(proto.content).metrics["loss:sum"]
    assert math.isnan(decoded) or math.isinf(decoded)
