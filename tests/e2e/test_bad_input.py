"""Bad input gets a clear 4xx with a machine-readable error, and the server keeps serving everyone else."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.e2e.wire import SMOL, datum, error_of, fb_body, new_run, new_session, result
from tests.proto_wire import sdk_bytes, sdk_request

pytestmark = pytest.mark.e2e

GOOD = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def run_id(server) -> str:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.api_key}, timeout=60) as http:
        return new_run(http)


def test_missing_or_wrong_key_is_401(server) -> None:
    assert error_of(httpx.post(f"{server.url}/api/v1/create_session", json={}))["code"] == "unauthenticated"
    bad = httpx.post(f"{server.url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-nope"})
    assert bad.status_code == 401 and error_of(bad)["code"] == "unauthenticated"


def test_unknown_base_model(http) -> None:
    response = http.post(
        "/api/v1/create_model",
        json={
            "session_id": new_session(http),
            "model_seq_id": 0,
            "base_model": "no/such-model",
            "lora_config": {"rank": 4},
        },
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "unknown_model" and error_of(response)["param"] == "base_model"


def test_rank_above_the_limit(http) -> None:
    response = http.post(
        "/api/v1/create_model",
        json={"session_id": new_session(http), "model_seq_id": 0, "base_model": SMOL, "lora_config": {"rank": 4096}},
    )
    assert response.status_code == 400 and "max LoRA rank" in error_of(response)["message"]


def test_unknown_model_id_is_404(http) -> None:
    response = http.post("/api/v1/forward_backward", json=fb_body("nope:train:0", 1, [datum(GOOD)]))
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("data", "loss_fn", "param"),
    [
        ([datum([1, 2, 49152])], "cross_entropy", "data.0.model_input"),
        ([datum([1, -1, 3])], "cross_entropy", "data.0.model_input"),
        ([datum(GOOD, weights=[1.0, 1.0])], "cross_entropy", "data.0.loss_fn_inputs.weights"),
        (
            [datum(GOOD, logprobs=[0.0] * 4, advantages=[1.0, math.nan, 0.0, 0.0])],
            "importance_sampling",
            "data.0.loss_fn_inputs.advantages",
        ),
        ([datum(GOOD, logprobs=[0.0] * 4)], "ppo", "data.0.loss_fn_inputs"),
        ([], "cross_entropy", "data"),
    ],
    ids=["token-above-vocab", "negative-token", "shape-mismatch", "nan-advantage", "missing-input", "empty-batch"],
)
def test_invalid_forward_backward(http, run_id, data, loss_fn, param) -> None:
    body = fb_body(run_id, 1, data, loss_fn)
    as_json = http.post(
        "/api/v1/forward_backward", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    as_proto = http.post(
        "/api/v1/forward_backward",
        content=sdk_bytes(sdk_request(body)),
        headers={"content-type": "application/x-protobuf"},
    )
    for response in (as_json, as_proto):
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "invalid_request" and error["param"] == param, error


def test_unknown_loss(http, run_id) -> None:
    response = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(GOOD)], "hinge"))
    assert response.status_code == 400 and "loss_fn" in error_of(response)["param"]


def test_unknown_loss_config_key(http, run_id) -> None:
    response = http.post(
        "/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(GOOD)], loss_fn_config={"beta": 1.0})
    )
    assert response.status_code == 400 and error_of(response)["param"] == "loss_fn_config"


def test_malformed_protobuf(http, run_id) -> None:
    response = http.post(
        "/api/v1/forward_backward", content=b"\xff\x00garbage", headers={"content-type": "application/x-protobuf"}
    )
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_request"


def test_oversized_body_is_413(http) -> None:
    response = http.post(
        "/api/v1/forward_backward", content=b"x" * (65 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"


def test_bad_sampling_params(http, run_id) -> None:
    body = {
        "base_model": SMOL,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": GOOD}]},
        "sampling_params": {"max_tokens": 4, "top_p": 0.0},
        "num_samples": 1,
    }
    response = http.post("/api/v1/asample", json=body)
    assert response.status_code == 400 and error_of(response)["param"] == "sampling_params.top_p"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/v1/forward_backward", {"seq_id": 2**63}, "seq_id"),
        ("/api/v1/forward_backward", {"seq_id": 10**6}, "seq_id"),
        ("/api/v1/save_weights", {"seq_id": 1, "path": "c", "ttl_seconds": 10**18}, "ttl_seconds"),
        ("/api/v1/save_weights", {"seq_id": 1, "path": ".."}, "path"),
        ("/api/v1/optim_step", {"seq_id": 1, "adam_params": {"learning_rate": 1e30}}, "adam_params.learning_rate"),
    ],
    ids=["seq-2**63", "seq-far-ahead", "ttl-10**18", "name-dotdot", "lr-1e30"],
)
def test_numbers_out_of_bounds_are_400_at_submit(http, run_id, path, body, param) -> None:
    """Issue 9: each was accepted (and failed in the worker, or waited forever) or was a text/plain 500."""
    if path.endswith("forward_backward"):
        body = fb_body(run_id, body["seq_id"], [datum(GOOD)])
    response = http.post(path, json={"model_id": run_id, **body})
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == param, error
    assert error["request_id"] == response.headers["x-request-id"]


def test_compressed_body_is_415_before_it_is_read(http, run_id) -> None:
    """A 32 KB zstd bomb (2 GB decompressed) is refused by its header: the server never decompresses it."""
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (256 << 20))
    response = http.post(
        "/api/v1/forward_backward",
        content=bomb,
        headers={"content-type": "application/x-protobuf", "content-encoding": "zstd"},
    )
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


def test_server_keeps_serving_after_bad_requests(http, run_id) -> None:
    """After every rejection above, the same run trains: seq 1 was never consumed by a bad request."""
    future = http.post("/api/v1/forward_backward", json=fb_body(run_id, 1, [datum(GOOD)])).json()
    out = result(http, future["request_id"])
    assert out["metrics"]["loss:sum"] > 0 and len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == 4


def test_requests_the_tinker_sdk_had_refused_never_wedge_its_run(tinker_env) -> None:
    """The SDK numbers every op when it is called; refused ones must not leave holes the run waits on forever."""
    import tinker
    from tinker import types

    training = tinker.ServiceClient().create_lora_training_client(base_model=SMOL, rank=4, seed=5)

    def datum_of(n: int) -> types.Datum:
        tokens = list(range(1, n + 1))
        targets = types.TensorData(data=tokens, dtype="int64", shape=[n])
        return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets})

    refusals = [
        (lambda: training.forward_backward([datum_of(8192)], "cross_entropy").result(), "request_too_large"),
        (lambda: training.save_state("..").result(), "checkpoint name must match"),
        (lambda: training.optim_step(types.AdamParams(learning_rate=1e30)).result(), "learning_rate"),
    ]
    for call, reason in refusals:
        with pytest.raises(tinker.APIStatusError) as refused:
            call()
        assert 400 <= refused.value.status_code < 500 and reason in str(refused.value.body)
    loss = training.forward_backward([datum_of(16)], "cross_entropy").result().metrics["loss:sum"]
    assert math.isfinite(loss) and loss > 0
    assert training.optim_step(types.AdamParams(learning_rate=1e-3)).result() is not None
