"""Validation at the door (issue 9): every request the engine cannot hold is a JSON 4xx naming the field, at submit.

Driven in-process through the real app (`LOOM_QUEUE=external`: nothing loads a model). Each case was accepted (200)
or crashed the server (a text/plain 500) before the bounds of `loom.types.limits` were enforced:

- out-of-range numbers: TTLs, seeds, learning rates, 64-bit ids and seq_ids, REST pages (items 1, 2, 3, 8, 10);
- inconsistent or oversized tensors: sparse CSR layouts, K of 2-D targets, a dense count too large (items 8, 9);
- a seq_id far ahead of the run's newest op (item 10), while a replay of a submitted seq_id still works;
- JSON nested too deep to store, OpenAI content parts whose `text` is not a string, compressed bodies (items 8, 10);
- an exception no handler takes is a JSON 500 with the request id, not a dropped connection;
- every POST route publishes its request schema in OpenAPI, the raw-body ones with their protobuf form.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zstandard
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.middleware import RefuseContentEncoding
from contract.settings import Settings
from loom.types.limits import INT64_MAX, MAX_DATUMS, MAX_PAGE_SIZE, MAX_TARGET_K, SEQ_ID_WINDOW
from tests.job_payloads import fb_input

BASE = "tiny-kimi-k2"


@pytest.fixture
def door(tmp_path: Path):
    state = build_state(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    app = create_app(state=state)
    client = TestClient(app, headers={"X-API-Key": key})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    created = client.post(
        "/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}},
    )
    assert created.status_code == 200, created.text
    yield client, app, session_id, f"{session_id}:train:0"


def rejected(response, param: str, status: int = 400) -> dict:
    """The JSON error of a refused request, checked to name `param` and carry the response's request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def fb_body(model_id: str, seq_id: int, target: dict, tokens: tuple[int, ...] = (1, 2, 3)) -> dict:
    datum = {"model_input": {"chunks": [{"tokens": list(tokens)}]}, "loss_fn_inputs": {"target_tokens": target}}
    return {
        "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
        "model_id": model_id,
        "seq_id": seq_id,
    }


def sparse(shape: list[int], crow: list[int], col: list[int], data: list[int]) -> dict:
    return {"data": data, "dtype": "int64", "shape": shape, "sparse_crow_indices": crow, "sparse_col_indices": col}


@pytest.mark.parametrize("route", ["save_weights", "save_weights_for_sampler"])
def test_ttl_beyond_the_limit_is_400(door, route: str) -> None:
    client, _, _, model_id = door
    body = {"model_id": model_id, "seq_id": 1, "path": "ckpt", "ttl_seconds": 10**18}
    rejected(client.post(f"/api/v1/{route}", json=body), "ttl_seconds")


def test_seeds_beyond_64_bits_are_400(door) -> None:
    client, _, session_id, _ = door
    prompt = {"chunks": [{"tokens": [1, 2]}]}
    asample = {"base_model": BASE, "prompt": prompt, "sampling_params": {"seed": 2**64, "max_tokens": 2}}
    rejected(client.post("/api/v1/asample", json=asample), "sampling_params.seed")
    chat = {"model": BASE, "seed": 2**64, "messages": [{"role": "user", "content": "hi"}]}
    rejected(client.post("/v1/chat/completions", json=chat), "seed")
    rejected(client.post("/v1/completions", json={"model": BASE, "seed": 2**64, "prompt": "hi"}), "seed")
    lora = {"rank": 4, "seed": 2**63}
    create = {"session_id": session_id, "model_seq_id": 1, "base_model": BASE, "lora_config": lora}
    rejected(client.post("/api/v1/create_model", json=create), "lora_config.seed")


def test_learning_rate_beyond_the_limit_is_400(door) -> None:
    client, _, _, model_id = door
    body = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e30}}
    rejected(client.post("/api/v1/optim_step", json=body), "adam_params.learning_rate")


def test_ids_beyond_64_bits_are_400_not_500(door) -> None:
    client, _, session_id, model_id = door
    create = {"session_id": session_id, "model_seq_id": 2**63, "base_model": BASE}
    rejected(client.post("/api/v1/create_model", json=create), "model_seq_id")
    sampler = {"session_id": session_id, "sampling_session_seq_id": 2**63, "base_model": BASE}
    rejected(client.post("/api/v1/create_sampling_session", json=sampler), "sampling_session_seq_id")
    body = {"forward_backward_input": fb_input([5, 6, 7]).to_wire(), "model_id": model_id, "seq_id": 2**63}
    rejected(client.post("/api/v1/forward_backward", json=body), "seq_id")


@pytest.mark.parametrize(
    ("params", "param"),
    [({"offset": 2**63}, "offset"), ({"offset": -1}, "offset"), ({"limit": -1}, "limit"), ({"limit": 0}, "limit")]
    + [({"limit": MAX_PAGE_SIZE + 1}, "limit"), ({"limit": 10**8}, "limit")],
)
def test_rest_pages_are_bounded(door, params: dict, param: str) -> None:
    client = door[0]
    rejected(client.get("/api/v1/training_runs", params=params), param)
    ok = client.get("/api/v1/training_runs", params={"limit": MAX_PAGE_SIZE, "offset": INT64_MAX})
    assert ok.status_code == 200 and ok.json()["training_runs"] == []


TARGET = "forward_backward_input.data.0.loss_fn_inputs.target_tokens"


@pytest.mark.parametrize(
    ("target", "param"),
    [
        (sparse([3, 8], [0, 1, 1, 1], [8], [5]), TARGET),  # column index == ncols
        (sparse([3, 8], [0, 1, 1, 1], [-1], [5]), f"{TARGET}.sparse_col_indices.0"),
        (sparse([3, 8], [0, 2, 1, 2], [0, 1], [5, 6]), TARGET),  # decreasing row pointers
        (sparse([3, 8], [1, 1, 1, 2], [0], [5]), TARGET),  # row pointers not starting at 0
        (sparse([3, 8], [0, 1, 1, 1], [2**63], [5]), f"{TARGET}.sparse_col_indices.0"),
        (sparse([3, 5_000_000], [0, 1, 1, 1], [3], [5]), "data.0.loss_fn_inputs.target_tokens"),  # K > MAX_TARGET_K
        (sparse([3, 2**40], [0, 0, 0, 0], [], []), TARGET),  # an empty tensor with a huge dense count
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [3, -1]}, f"{TARGET}.shape.1"),
        ({"data": [2**63, 2, 3], "dtype": "int64", "shape": [3]}, TARGET),
        ({"data": [1.0, 10**400, 1.0], "dtype": "float32", "shape": [3]}, TARGET),
    ],
    ids=[
        "col-eq-ncols",
        "col-negative",
        "crow-decreasing",
        "crow-not-0",
        "col-2**63",
        "huge-k",
        "huge-dense",
        "negative-dim",
        "int64-overflow",
        "float32-overflow",
    ],
)
def test_inconsistent_or_oversized_tensors_are_400(door, target: dict, param: str) -> None:
    client, _, _, model_id = door
    error = rejected(client.post("/api/v1/forward_backward", json=fb_body(model_id, 1, target)), param)
    assert error["code"] == "invalid_request"


def test_target_k_is_bounded(door) -> None:
    client, _, _, model_id = door
    k = MAX_TARGET_K + 1
    dense = {"data": [1] * (3 * k), "dtype": "int64", "shape": [3, k]}
    error = rejected(
        client.post("/api/v1/forward_backward", json=fb_body(model_id, 1, dense)),
        "data.0.loss_fn_inputs.target_tokens",
    )
    assert str(MAX_TARGET_K) in error["message"]


def test_too_many_datums_are_400(door) -> None:
    client, _, _, model_id = door
    body = {"forward_backward_input": fb_input([5, 6, 7]).to_wire(), "model_id": model_id, "seq_id": 1}
    body["forward_backward_input"]["data"] *= MAX_DATUMS + 1
    rejected(client.post("/api/v1/forward_backward", json=body), "forward_backward_input.data")


def test_seq_id_far_ahead_is_400_and_replays_still_work(door) -> None:
    client, _, _, model_id = door

    def fb(seq_id: int):
        body = {"forward_backward_input": fb_input([5, 6, 7]).to_wire(), "model_id": model_id, "seq_id": seq_id}
        return client.post("/api/v1/forward_backward", json=body)

    rejected(fb(SEQ_ID_WINDOW + 1), "seq_id")  # the newest op is the creation, seq 0
    first = fb(SEQ_ID_WINDOW)
    assert first.status_code == 200, first.text
    replay = fb(SEQ_ID_WINDOW)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert fb(2 * SEQ_ID_WINDOW).status_code == 200
    rejected(fb(2 * SEQ_ID_WINDOW + SEQ_ID_WINDOW + 1), "seq_id")
    step = {"model_id": model_id, "seq_id": 10**9, "adam_params": {}}
    rejected(client.post("/api/v1/optim_step", json=step), "seq_id")


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "x" * 129, "name\n"])
def test_checkpoint_names_are_checked(door, name: str) -> None:
    client, _, _, model_id = door
    rejected(client.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 1, "path": name}), "path")


def test_json_too_deep_to_store_is_400(door) -> None:
    client, _, session_id, model_id = door
    deep = "{" + '"a":{' * 900 + "}" * 901
    response = client.post(
        "/api/v1/create_session",
        content=f'{{"user_metadata": {deep}}}'.encode(),
        headers={"content-type": "application/json"},
    )
    rejected(response, "user_metadata")
    nested = "[" * 1000 + "]" * 1000
    body = f'{{"model_id": "{model_id}", "seq_id": 1, "data": {nested}, "loss_fn": "cross_entropy"}}'
    response = client.post(
        "/api/v1/forward_backward", content=body.encode(), headers={"content-type": "application/json"}
    )
    rejected(response, None)


def test_openai_content_text_must_be_a_string(door) -> None:
    client = door[0]
    chat = {"model": BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    error = rejected(client.post("/v1/chat/completions", json=chat), "messages.0.content.str")
    assert "string" in error["message"]


def test_compressed_bodies_are_refused_unread(door) -> None:
    client = door[0]
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    response = client.post(
        "/api/v1/forward_backward",
        content=bomb,
        headers={"content-type": "application/x-protobuf", "content-encoding": "zstd"},
    )
    assert rejected(response, "Content-Encoding", 415)["code"] == "unsupported_media_type"
    assert client.get("/api/v1/healthz").status_code == 200

    sent: list[dict] = []

    async def no_body() -> dict:
        raise AssertionError("the body was read")

    async def send(message: dict) -> None:
        sent.append(message)

    async def unreachable(scope, receive, send) -> None:
        raise AssertionError("the request reached the app")

    scope = {"type": "http", "headers": [(b"content-encoding", b"gzip, zstd")], "method": "POST", "path": "/"}
    asyncio.run(RefuseContentEncoding(unreachable)(scope, no_body, send))
    assert sent[0]["status"] == 415


def test_unhandled_errors_answer_json_with_the_request_id(door) -> None:
    _, app, _, _ = door

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    # raise_server_exceptions=True (the default): the test fails if the exception escapes the app
    client = TestClient(app)
    response = client.get("/boom", headers={"x-request-id": "req-abc"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "req-abc"
    assert response.json()["error"] == {
        "code": "internal_error",
        "message": "internal server error; quote the request_id to report it",
        "param": None,
        "type": "api_error",
        "request_id": "req-abc",
    }
    assert client.get("/api/v1/healthz").status_code == 200


def test_every_post_route_publishes_its_request_schema(door) -> None:
    """...unless it reads no body at all: no body parameter, and no `Request` to read a raw one from (e.g. publish)."""
    doc = door[0].get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    routes = [getattr(route, "original_router", route) for route in door[1].routes]  # included routers' routes
    routes = [inner for route in routes for inner in getattr(route, "routes", [route])]
    bodiless = {
        route.path
        for route in routes
        if isinstance(route, APIRoute) and route.body_field is None and route.dependant.request_param_name is None
    }
    assert posts and all("requestBody" in op for path, op in posts.items() if path not in bodiless), [
        p for p, op in posts.items() if "requestBody" not in op and p not in bodiless
    ]
    for path, name in (("/api/v1/forward_backward", "ForwardBackwardRequest"), ("/api/v1/forward", "ForwardRequest")):
        content = posts[path]["requestBody"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert content["application/x-protobuf"]["schema"]["format"] == "binary"
        assert name in doc["components"]["schemas"]
    seed = doc["components"]["schemas"]["SamplingParams"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, float(INT64_MAX))  # FastAPI's schema model holds floats
