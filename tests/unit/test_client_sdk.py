"""The Loom SDK (loom.ServiceClient & co.) against an in-process fake server.

The server is not under test here: ``FakeServer`` is a small httpx.MockTransport
handler that speaks just enough of the /api/v1 protocol and records every
request, so the tests can check headers, bodies, seq_ids and retry behaviour.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import loom
from loom import types

FAST = loom.RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01, jitter=0.0)


class FakeServer:
    """Answers the /api/v1 routes; ``hooks`` can override a route's behaviour."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()
        self.results: dict[str, Any] = {}
        self.pending_polls: dict[str, int] = {}
        self.try_again_polls = 0
        self.ids = itertools.count()
        self.hooks: dict[str, Callable[[httpx.Request, dict], httpx.Response | None]] = {}

    # ---------------------------------------------------------------- helpers
    def bodies(self, path: str) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path and r.content]

    def calls(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == path]

    def _future(self, result: Any, model_id: str | None = None) -> httpx.Response:
        request_id = f"req-{next(self.ids)}"
        self.results[request_id] = result
        self.pending_polls[request_id] = self.try_again_polls
        body = {"request_id": request_id}
        if model_id:
            body["model_id"] = model_id
        return httpx.Response(200, json=body)

    # ---------------------------------------------------------------- handler
    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        hook = self.hooks.get(path)
        if hook is not None:
            response = hook(request, body)
            if response is not None:
                return response
        if path == "/api/v1/create_session":
            return httpx.Response(200, json={"session_id": "sess", "type": "create_session"})
        if path == "/api/v1/session_heartbeat":
            return httpx.Response(200, json={"type": "session_heartbeat"})
        if path == "/api/v1/get_server_capabilities":
            return httpx.Response(200, json={"supported_models": [{"model_name": "tiny", "max_context_length": 64}]})
        if path == "/api/v1/create_model":
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            return self._future({"model_id": model_id, "type": "create_model"}, model_id)
        if path == "/api/v1/forward_backward":
            n = len(body["forward_backward_input"]["data"])
            out = {
                "loss_fn_output_type": "ArrayRecord",
                "loss_fn_outputs": [{"logprobs": {"data": [-1.0], "dtype": "float32", "shape": [1]}}] * n,
                "metrics": {"loss:sum": float(body["seq_id"])},
            }
            return self._future(out, body["model_id"])
        if path == "/api/v1/optim_step":
            return self._future({"metrics": {"step": float(body["seq_id"])}}, body["model_id"])
        if path == "/api/v1/save_weights":
            return self._future({"path": f"tinker://{body['model_id']}/weights/{body['path']}"}, body["model_id"])
        if path == "/api/v1/save_weights_for_sampler":
            if body.get("path"):
                result = {"path": f"tinker://{body['model_id']}/sampler_weights/{body['path']}"}
            else:
                result = {"sampling_session_id": f"sess:sample:{body['sampling_session_seq_id']}"}
            return self._future(result, body["model_id"])
        if path == "/api/v1/load_weights":
            return self._future({"path": body["path"], "model_id": body["model_id"]}, body["model_id"])
        if path == "/api/v1/get_info":
            return httpx.Response(
                200,
                json={
                    "type": "get_info",
                    "model_id": body["model_id"],
                    "model_data": {"model_name": "tiny", "tokenizer_id": "tok/x:v2"},
                },
            )
        if path == "/api/v1/weights_info":
            return httpx.Response(
                200,
                json={
                    "base_model": "tiny",
                    "is_lora": True,
                    "lora_rank": 4,
                    "train_mlp": True,
                    "train_attn": False,
                    "train_unembed": False,
                },
            )
        if path == "/api/v1/create_sampling_session":
            return httpx.Response(200, json={"sampling_session_id": f"sess:sample:{body['sampling_session_seq_id']}"})
        if path == "/api/v1/asample":
            n_prompt = sum(len(c["tokens"]) for c in body["prompt"]["chunks"])
            result = {
                "type": "sample",
                "sequences": [{"stop_reason": "length", "tokens": [7], "logprobs": [-0.5]}] * body["num_samples"],
                "prompt_logprobs": ([None] + [-1.0] * (n_prompt - 1)) if body.get("prompt_logprobs") else None,
            }
            return self._future(result)
        if path == "/api/v1/retrieve_future":
            request_id = body["request_id"]
            if request_id not in self.results:
                return httpx.Response(404, json={"detail": {"code": "unknown_request", "message": "no such request"}})
            if self.pending_polls[request_id] > 0:
                self.pending_polls[request_id] -= 1
                return httpx.Response(
                    200, json={"type": "try_again", "request_id": request_id, "queue_state": "active"}
                )
            return httpx.Response(200, json=self.results[request_id])
        if path == "/api/v1/training_runs":
            return httpx.Response(
                200, json={"training_runs": [], "cursor": {"offset": 0, "limit": 5, "total_count": 0}}
            )
        if path.startswith("/api/v1/training_runs/") and path.endswith("/checkpoints") and request.method == "GET":
            return httpx.Response(
                200,
                json={
                    "checkpoints": [
                        {
                            "checkpoint_id": "weights/a",
                            "checkpoint_type": "training",
                            "time": "2026-01-01T00:00:00Z",
                            "tinker_path": "tinker://r/weights/a",
                        }
                    ]
                },
            )
        if path.startswith("/api/v1/training_runs/") and request.method == "DELETE":
            return httpx.Response(204)
        if path == "/api/v1/sessions/sess/finish":
            status = {"type": "client_finished", **body}
            return httpx.Response(
                200, json={"session_id": "sess", "finished_at": "2026-01-01T00:00:00Z", "status": status}
            )
        return httpx.Response(404, json={"detail": "not found"})


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def service(server: FakeServer):
    client = loom.ServiceClient(
        base_url="http://loom.test",
        api_key="tml-test",
        transport=httpx.MockTransport(server),
        retry=FAST,
        heartbeat_interval=0.05,
    )
    yield client
    client.close()


def _datum(tokens=(1, 2, 3)) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens)),
        loss_fn_inputs={"target_tokens": list(tokens[1:]) + [0], "weights": [1.0] * len(tokens)},
    )


# ---------------------------------------------------------------- basics
def test_headers_and_session(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny", rank=4)
    assert tc.model_id == "sess:train:0"
    create = server.calls("/api/v1/create_model")[0]
    assert create.headers["X-API-Key"] == "tml-test"
    assert "protobuf" not in create.headers.get("accept", "")
    assert create.headers["content-type"] == "application/json"
    body = server.bodies("/api/v1/create_model")[0]
    assert body == {
        "session_id": "sess",
        "model_seq_id": 0,
        "base_model": "tiny",
        "type": "create_model",
        "lora_config": {"rank": 4, "train_unembed": True, "train_mlp": True, "train_attn": True},
    }
    assert len(server.calls("/api/v1/create_session")) == 1
    time.sleep(0.3)
    beats = server.bodies("/api/v1/session_heartbeat")
    assert beats and beats[0] == {"session_id": "sess", "type": "session_heartbeat"}


def test_env_configuration(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
    monkeypatch.delenv("LOOM_BASE_URL", raising=False)
    monkeypatch.delenv("LOOM_API_KEY", raising=False)
    monkeypatch.setenv("TINKER_BASE_URL", "http://tinker.env")
    monkeypatch.setenv("TINKER_API_KEY", "tml-env")
    with loom.ServiceClient(transport=httpx.MockTransport(server)) as sc:
        assert sc.base_url == "http://tinker.env"
        assert sc.get_server_capabilities().supported_models[0].model_name == "tiny"
    request = server.calls("/api/v1/get_server_capabilities")[0]
    assert str(request.url).startswith("http://tinker.env/") and request.headers["X-API-Key"] == "tml-env"
    monkeypatch.setenv("LOOM_BASE_URL", "http://loom.env")
    with loom.ServiceClient(transport=httpx.MockTransport(server)) as sc:
        assert sc.base_url == "http://loom.env"


# ---------------------------------------------------------------- seq ids
def test_training_seq_ids_increase(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    futures = [
        tc.forward_backward([_datum()], "cross_entropy"),
        tc.optim_step(types.AdamParams(learning_rate=1e-3)),
        tc.forward([_datum()], "cross_entropy"),
        tc.save_state("s1"),
        tc.save_weights_for_sampler("w1"),
        tc.load_state("tinker://sess:train:0/weights/s1"),
    ]
    results = [f.result(timeout=10) for f in futures]
    assert results[0].metrics["loss:sum"] == 1.0
    assert results[1].metrics == {"step": 2.0}
    assert results[3].path == "tinker://sess:train:0/weights/s1"
    assert results[4].path == "tinker://sess:train:0/sampler_weights/w1"
    order = [
        json.loads(r.content)
        for r in server.requests
        if r.url.path
        in {
            "/api/v1/forward_backward",
            "/api/v1/optim_step",
            "/api/v1/save_weights",
            "/api/v1/save_weights_for_sampler",
            "/api/v1/load_weights",
        }
    ]
    assert [b["seq_id"] for b in order] == [1, 2, 3, 4, 5, 6]
    assert order[2]["forward_only"] is True and "forward_only" not in order[0]
    assert order[5]["optimizer"] is False
    # a second training client starts again at seq 1, with the next model_seq_id
    tc2 = service.create_lora_training_client("tiny")
    assert tc2.model_id == "sess:train:1"
    tc2.optim_step(types.AdamParams()).result(timeout=10)
    assert server.bodies("/api/v1/optim_step")[-1]["seq_id"] == 1


def test_submissions_follow_seq_order_under_threads(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    futures: list[loom.APIFuture] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            f = tc.optim_step(types.AdamParams())
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futures:
        f.result(timeout=10)
    assert [b["seq_id"] for b in server.bodies("/api/v1/optim_step")] == list(range(1, 41))


def test_forward_backward_body_shape(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    tc.forward_backward([_datum((4, 5))], "ppo", {"clip_low_threshold": 0.9}).result(timeout=10)
    body = server.bodies("/api/v1/forward_backward")[0]
    assert body == {
        "forward_backward_input": {
            "data": [
                {
                    "model_input": {"chunks": [{"tokens": [4, 5], "type": "encoded_text"}]},
                    "loss_fn_inputs": {
                        "target_tokens": {"data": [5, 0], "dtype": "int64", "shape": [2]},
                        "weights": {"data": [1.0, 1.0], "dtype": "float32", "shape": [2]},
                    },
                }
            ],
            "loss_fn": "ppo",
            "loss_fn_config": {"clip_low_threshold": 0.9},
        },
        "model_id": "sess:train:0",
        "seq_id": 1,
    }


def test_sampling_seq_ids_and_session_counter(server: FakeServer, service: loom.ServiceClient) -> None:
    sc = service.create_sampling_client(base_model="tiny")
    assert sc.sampling_session_id == "sess:sample:0"
    tc = service.create_lora_training_client("tiny")
    snap = tc.save_weights_and_get_sampling_client()
    assert snap.sampling_session_id == "sess:sample:1"  # shared counter
    r1 = sc.sample(types.ModelInput.from_ints([1, 2]), 2, types.SamplingParams(max_tokens=3)).result(timeout=10)
    lps = sc.compute_logprobs(types.ModelInput.from_ints([1, 2, 3])).result(timeout=10)
    assert [s.tokens for s in r1.sequences] == [[7], [7]]
    assert lps == [None, -1.0, -1.0]
    bodies = server.bodies("/api/v1/asample")
    assert [(b["sampling_session_id"], b["seq_id"]) for b in bodies] == [("sess:sample:0", 0), ("sess:sample:0", 1)]
    assert bodies[0]["type"] == "sample" and bodies[0]["prompt_logprobs"] is False
    assert bodies[1]["prompt_logprobs"] is True and bodies[1]["sampling_params"]["max_tokens"] == 1
    with pytest.raises(ValueError):
        service.create_sampling_client(model_path="s3://nope")


# ------------------------------------------------------------- idempotency
def test_idempotency_key_stable_across_retries(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    attempts = {"n": 0}

    def flaky(request: httpx.Request, body: dict) -> httpx.Response | None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            return httpx.Response(503, json={"detail": "overloaded"})
        if attempts["n"] == 2:
            raise httpx.ConnectError("connection reset", request=request)
        return None

    server.hooks["/api/v1/forward_backward"] = flaky
    out = tc.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    assert out.metrics["loss:sum"] == 1.0
    calls = server.calls("/api/v1/forward_backward")
    keys = [c.headers.get("X-Idempotency-Key") for c in calls]
    assert len(calls) == 3 and keys[0] and len(set(keys)) == 1
    # every attempt carried the same body and seq_id
    assert len({c.content for c in calls}) == 1
    # a new logical request gets a new key
    tc.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    assert server.calls("/api/v1/forward_backward")[-1].headers["X-Idempotency-Key"] != keys[0]


def test_submit_gives_up_after_max_attempts(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    server.hooks["/api/v1/optim_step"] = lambda req, body: httpx.Response(500, json={"detail": "boom"})
    with pytest.raises(loom.InternalServerError):
        tc.optim_step(types.AdamParams()).result(timeout=10)
    assert len(server.calls("/api/v1/optim_step")) == FAST.max_attempts
    # the run's next request cannot be submitted out of order
    server.hooks.clear()
    with pytest.raises(loom.LoomError):
        tc.optim_step(types.AdamParams()).result(timeout=10)


def test_503_waits_retry_after_with_one_idempotency_key(server: FakeServer, service: loom.ServiceClient) -> None:
    """A server whose database is briefly down answers 503 + Retry-After: the SDK waits that long, then resends."""
    tc = service.create_lora_training_client("tiny")
    unavailable = {"error": {"code": "service_unavailable", "message": "database down", "param": None}}
    answers = iter([httpx.Response(503, json=unavailable, headers={"Retry-After": "0.2"})] * 2)
    server.hooks["/api/v1/optim_step"] = lambda req, body: next(answers, None)
    started = time.monotonic()
    assert tc.optim_step(types.AdamParams()).result(timeout=10).metrics == {"step": 1.0}
    assert time.monotonic() - started >= 0.4  # FAST alone would have slept about 0.003 s
    keys = {c.headers["X-Idempotency-Key"] for c in server.calls("/api/v1/optim_step")}
    assert len(server.calls("/api/v1/optim_step")) == 3 and len(keys) == 1


def test_retries_stop_at_the_total_time_budget(server: FakeServer) -> None:
    policy = loom.RetryPolicy(max_attempts=100, base_delay=0.05, max_delay=0.05, jitter=0.0, max_total_seconds=0.3)
    client = loom.ServiceClient(
        base_url="http://loom.test", api_key="tml-test", transport=httpx.MockTransport(server), retry=policy
    )
    try:
        server.hooks["/api/v1/get_server_capabilities"] = lambda req, body: httpx.Response(
            503, json={"detail": "down"}, headers={"Retry-After": "0.1"}
        )
        started = time.monotonic()
        with pytest.raises(loom.InternalServerError) as info:
            client.get_server_capabilities()
        assert info.value.status_code == 503 and time.monotonic() - started < 2
        assert 2 <= len(server.calls("/api/v1/get_server_capabilities")) <= 5
    finally:
        client.close()


def test_4xx_raises_typed_error_with_code(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    server.hooks["/api/v1/forward_backward"] = lambda req, body: httpx.Response(
        400, json={"detail": {"code": "unsupported_chunk", "message": "image chunks are not supported"}}
    )
    with pytest.raises(loom.BadRequestError) as info:
        tc.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    assert info.value.code == "unsupported_chunk" and info.value.status_code == 400
    assert "image chunks" in str(info.value)
    assert len(server.calls("/api/v1/forward_backward")) == 1  # not retried
    # the rejected request used no seq_id: the run's next request is still seq 1
    assert tc.optim_step(types.AdamParams()).result(timeout=10).metrics == {"step": 1.0}
    assert server.bodies("/api/v1/forward_backward")[0]["seq_id"] == 1
    server.hooks["/api/v1/get_server_capabilities"] = lambda req, body: httpx.Response(
        401, json={"error": {"code": "invalid_api_key", "message": "bad key", "param": None}, "detail": "bad key"}
    )
    with pytest.raises(loom.AuthenticationError) as auth:
        service.get_server_capabilities()
    assert auth.value.code == "invalid_api_key" and auth.value.message == "bad key"
    # the shape api/errors.py produces
    server.hooks["/api/v1/get_server_capabilities"] = lambda req, body: httpx.Response(
        400,
        json={
            "error": {"code": "invalid_request", "message": "rank too big", "param": "lora_config.rank"},
            "detail": "rank too big",
        },
    )
    with pytest.raises(loom.BadRequestError) as bad:
        service.get_server_capabilities()
    assert (bad.value.code, bad.value.message, bad.value.param) == (
        "invalid_request",
        "rank too big",
        "lora_config.rank",
    )


# ----------------------------------------------------------------- futures
def test_try_again_then_result(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    server.try_again_polls = 3
    out = tc.optim_step(types.AdamParams()).result(timeout=10)
    assert out.metrics == {"step": 1.0}
    polls = server.bodies("/api/v1/retrieve_future")
    request_id = polls[-1]["request_id"]
    assert sum(1 for p in polls if p["request_id"] == request_id) == 4
    assert polls[-1] == {"request_id": request_id, "allow_metadata_only": False}


def test_poll_retries_408_and_5xx(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    script = iter(
        [
            httpx.Response(408, json={"type": "try_again", "request_id": "x", "queue_state": "active"}),
            httpx.Response(502, text="bad gateway"),
        ]
    )

    def flaky(request: httpx.Request, body: dict) -> httpx.Response | None:
        return next(script, None)

    server.hooks["/api/v1/retrieve_future"] = flaky
    assert tc.optim_step(types.AdamParams()).result(timeout=10).metrics == {"step": 1.0}


def test_request_failed_raises(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    server.hooks["/api/v1/retrieve_future"] = lambda req, body: httpx.Response(
        200, json={"error": "target_tokens has the wrong length", "category": "user"}
    )
    with pytest.raises(loom.RequestFailedError) as info:
        tc.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    assert info.value.category == "user" and "wrong length" in info.value.message
    assert info.value.request_id


def test_unknown_future_is_a_typed_404(server: FakeServer, service: loom.ServiceClient) -> None:
    from loom.futures import poll_result

    with pytest.raises(loom.NotFoundError) as info:
        service._http.call(poll_result(service._http, "nope", types.OptimStepResponse))
    assert info.value.code == "unknown_request"


def test_result_timeout_and_async_twins(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    release = threading.Event()

    def slow(request: httpx.Request, body: dict) -> httpx.Response | None:
        if not release.is_set():
            return httpx.Response(
                200, json={"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}
            )
        return None

    server.hooks["/api/v1/retrieve_future"] = slow
    fut = tc.optim_step(types.AdamParams())
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.2)
    assert not fut.done()
    release.set()
    assert fut.result(timeout=10).metrics == {"step": 1.0}

    async def main() -> None:
        f1 = await tc.forward_backward_async([_datum()], "cross_entropy")
        f2 = await tc.optim_step_async(types.AdamParams())
        assert isinstance(f1, loom.APIFuture)
        out1 = await f1
        out2 = await f2.result_async(timeout=10)
        assert out1.metrics["loss:sum"] == 2.0 and out2.metrics == {"step": 3.0}
        sc = await service.create_sampling_client_async(base_model="tiny")
        res = await sc.sample_async([1, 2], 1, {"max_tokens": 2})
        assert res.sequences[0].tokens == [7]
        assert await sc.compute_logprobs_async([1, 2]) == [None, -1.0]
        tc2 = await service.create_lora_training_client_async("tiny", rank=2)
        assert tc2.model_id == "sess:train:1"

    asyncio.run(main())


# ------------------------------------------------------------ misc clients
def test_info_tokenizer_id_and_from_state(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    assert tc.get_info().model_data.tokenizer_id == "tok/x"
    restored = service.create_training_client_from_state_with_optimizer("tinker://sess:train:0/weights/s1")
    create = server.bodies("/api/v1/create_model")[-1]
    assert create["lora_config"] == {"rank": 4, "train_unembed": False, "train_mlp": True, "train_attn": False}
    load = server.bodies("/api/v1/load_weights")[-1]
    assert load == {
        "model_id": restored.model_id,
        "seq_id": 1,
        "path": "tinker://sess:train:0/weights/s1",
        "optimizer": True,
        "type": "load_weights",
    }


def test_rest_client(server: FakeServer, service: loom.ServiceClient) -> None:
    rest = service.create_rest_client()
    runs = rest.list_training_runs(limit=5).result(timeout=10)
    assert runs.cursor.limit == 5
    request = server.calls("/api/v1/training_runs")[0]
    assert request.url.params["limit"] == "5" and request.url.params["access_scope"] == "owned"
    ckpts = rest.list_checkpoints("sess:train:0").result(timeout=10)
    assert ckpts.checkpoints[0].tinker_path == "tinker://r/weights/a"
    rest.delete_checkpoint_from_tinker_path("tinker://sess:train:0/weights/a").result(timeout=10)
    delete = [r for r in server.requests if r.method == "DELETE"][0]
    assert delete.url.path == "/api/v1/training_runs/sess:train:0/checkpoints/weights/a"
    assert delete.headers.get("X-Idempotency-Key")
    info = rest.get_weights_info_by_tinker_path("tinker://r/weights/a").result(timeout=10)
    assert info.lora_rank == 4
    # the REST client needs no session
    assert not server.calls("/api/v1/create_session")


def test_errors_pickle() -> None:
    import pickle

    err = loom.BadRequestError("nope", status_code=400, code="bad", body={"x": 1})
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is loom.BadRequestError and again.code == "bad" and again.status_code == 400
    failed = pickle.loads(pickle.dumps(loom.RequestFailedError("m", request_id="r", category="user")))
    assert failed.category == "user" and failed.request_id == "r"


def test_non_finite_floats_survive_the_wire(server: FakeServer, service: loom.ServiceClient) -> None:
    tc = service.create_lora_training_client("tiny")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 0], "logprobs": [float("-inf"), -1.0], "advantages": [1.0, 1.0]},
    )
    tc.forward_backward([datum], "importance_sampling").result(timeout=10)
    raw = server.calls("/api/v1/forward_backward")[0].content
    assert b"-Infinity" in raw
    parsed = types.ForwardBackwardRequest.model_validate_json(raw)
    assert parsed.forward_backward_input.data[0].loss_fn_inputs["logprobs"].data[0] == float("-inf")
    assert b"-Infinity" in parsed.model_dump_json().encode()


def test_save_weights_external_and_download_without_the_api_key(
    server: FakeServer, service: loom.ServiceClient, tmp_path
) -> None:
    files = {"adapter_model.safetensors": b"\0" * 70_000, "adapter_config.json": b"{}"}
    server.hooks["/api/v1/save_weights_external"] = lambda req, body: server._future(
        {"path": f"tinker://{body['model_id']}/external_weights/{body['path']}", "size_bytes": 70_002}
    )
    urls_path = "/api/v1/training_runs/r/checkpoints/external_weights/x/external_weights_urls"
    server.hooks[urls_path] = lambda req, body: httpx.Response(
        200,
        json={"urls": {n: f"https://bucket.test/{n}?sig=1" for n in files}, "expires": "2030-01-01T00:00:00Z"},
    )
    for name, data in files.items():
        server.hooks[f"/{name}"] = lambda req, body, data=data: httpx.Response(200, content=data)
    tc = service.create_lora_training_client("tiny")
    saved = tc.save_weights_external("x", ttl_seconds=3600, age_encryption_recipients=["age1abc"]).result(10)
    assert saved.path == "tinker://sess:train:0/external_weights/x" and saved.size_bytes == 70_002
    body = server.bodies("/api/v1/save_weights_external")[0]
    assert body["seq_id"] == 1 and body["ttl_seconds"] == 3600 and body["age_encryption_recipients"] == ["age1abc"]

    rest = service.create_rest_client()
    written = rest.download_checkpoint("tinker://r/external_weights/x", tmp_path / "out").result(10)
    assert {name: path.read_bytes() for name, path in written.items()} == files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files)  # no .part left behind
    downloads = [r for r in server.requests if r.url.host == "bucket.test"]
    assert len(downloads) == 2 and all("X-API-Key" not in r.headers for r in downloads)
    with pytest.raises(ValueError, match="save_weights_external"):
        rest.get_external_weights_urls("tinker://r/weights/x")

    server.hooks[urls_path] = lambda req, body: httpx.Response(
        200, json={"urls": {"../evil": "https://bucket.test/e"}, "expires": "2030-01-01T00:00:00Z"}
    )
    with pytest.raises(loom.LoomError, match="outside"):
        rest.download_checkpoint("tinker://r/external_weights/x", tmp_path / "out2").result(10)
    assert not (tmp_path / "evil").exists()
    server.hooks[urls_path] = lambda req, body: httpx.Response(
        200, json={"urls": {"a": "https://bucket.test/expired"}, "expires": "2030-01-01T00:00:00Z"}
    )
    server.hooks["/expired"] = lambda req, body: httpx.Response(403, json={"error": {"code": "forbidden"}})
    with pytest.raises(loom.PermissionDeniedError):
        rest.download_checkpoint("tinker://r/external_weights/x", tmp_path / "out3").result(10)


# ------------------------------------------------------------- sessions
def test_close_finishes_the_session_once_with_the_blocks_outcome(server: FakeServer) -> None:
    def make() -> loom.ServiceClient:
        return loom.ServiceClient(
            base_url="http://loom.test", api_key="tml-test", transport=httpx.MockTransport(server), retry=FAST
        )

    with make() as service:
        service.create_sampling_client(base_model="tiny")
    with pytest.raises(KeyError), make() as service:
        service.create_sampling_client(base_model="tiny")
        raise KeyError("boom")
    quiet = make()
    quiet.close()  # no session was ever created: nothing to finish
    quiet.close()
    finishes = server.bodies("/api/v1/sessions/sess/finish")
    assert [f["reason"]["type"] for f in finishes] == ["success", "errored"]


def test_a_finished_session_stops_heartbeating(server: FakeServer) -> None:
    beats = []

    def gone(request: httpx.Request, body: dict) -> httpx.Response:
        beats.append(body)
        return httpx.Response(410, json={"error": {"code": "session_finished", "message": "finished"}})

    server.hooks["/api/v1/session_heartbeat"] = gone
    service = loom.ServiceClient(
        base_url="http://loom.test",
        api_key="tml-test",
        transport=httpx.MockTransport(server),
        retry=FAST,
        heartbeat_interval=0.01,
    )
    service.create_sampling_client(base_model="tiny")
    service._http.call(asyncio.wait_for(service._heartbeat_task, 10))  # the loop ends by itself on the 410
    assert len(beats) == 1
    service.close()


def test_rest_session_methods(server: FakeServer, service: loom.ServiceClient) -> None:
    summary = {
        "session_id": "sess",
        "created_at": "2026-01-01T00:00:00Z",
        "owner": "alice",
        "project_id": "p2",
        "checkpoints_count": 0,
    }
    server.hooks["/api/v1/sessions/search"] = lambda r, b: httpx.Response(200, json={"sessions": [summary]})
    server.hooks["/api/v1/sessions/sess/project"] = lambda r, b: httpx.Response(200, json=summary)
    server.hooks["/api/v1/sessions/sess/trace_export"] = lambda r, b: httpx.Response(
        200, json={"status": "ready", "url": "http://loom.test/trace?signature=x"}
    )
    me = {
        "key_id": 7,
        "name": "k",
        "details": {"org_details": {"name": "alice"}, "user_details": {"email": "alice"}},
        "tenant": "alice",
        "prefix": "tml-abc",
        "created_at": "2026-01-01T00:00:00Z",
    }
    server.hooks["/api/v1/auth/apikey/me"] = lambda r, b: httpx.Response(200, json=me)
    rest = service.create_rest_client()
    found = rest.search_sessions(types.SessionSearchRequest(display_name="nightly", limit=5)).result()
    assert found.sessions[0].project_id == "p2"
    assert server.bodies("/api/v1/sessions/search")[0] == {
        "user_metadata": {},
        "display_name": "nightly",
        "owner": {"type": "own"},
        "limit": 5,
    }
    assert rest.assign_session_project("sess", "p2").result().session_id == "sess"
    assert server.bodies("/api/v1/sessions/sess/project") == [{"project_id": "p2"}]
    assert rest.export_session_trace("sess").result().status == "ready"
    assert rest.whoami().result().tenant == "alice"


def test_copy_weights_keeps_one_idempotency_key_across_retries(server: FakeServer, service: loom.ServiceClient) -> None:
    attempts = iter([httpx.Response(503, json={"detail": "busy"})])

    def copy(request: httpx.Request, body: dict) -> httpx.Response:
        return next(attempts, None) or httpx.Response(200, json={"tinker_path": "tinker://copy:train:0/weights/a"})

    server.hooks["/api/v1/copy_weights"] = copy
    rest = service.create_rest_client()
    path = rest.copy_weights("tinker://r/weights/a", "proj", ttl_seconds=7200).result(timeout=10)
    assert path == "tinker://copy:train:0/weights/a"
    calls = server.calls("/api/v1/copy_weights")
    assert len(calls) == 2 and len({c.headers["X-Idempotency-Key"] for c in calls}) == 1
    assert server.bodies("/api/v1/copy_weights")[0] == {
        "source_path": "tinker://r/weights/a",
        "destination_project_id": "proj",
        "ttl_seconds": 7200,
    }
    slot = asyncio.run(rest.copy_weights_async("tinker://r/weights/a", session_id="sess", model_seq_id=3))
    assert slot == path
    assert server.bodies("/api/v1/copy_weights")[-1] == {
        "source_path": "tinker://r/weights/a",
        "session_id": "sess",
        "model_seq_id": 3,
    }


def test_usage_queries(server: FakeServer, service: loom.ServiceClient) -> None:
    usage = {
        "data": [
            {
                "bucket_start": "2026-07-13T00:00:00Z",
                "bucket_end": "2026-07-13T01:00:00Z",
                "base_model": "tiny",
                "event_info": {"type": "sampling_prefill", "cached": True, "token_count": 5},
            }
        ],
        "sessions": {"s": {"user_metadata": {"a": "b"}}},
    }
    storage = {"data": [{"project_id": "p", "checkpoint_count": 2, "size_bytes": 10, "size_gigabytes": 1e-8}]}
    server.hooks["/api/v1/billing/usage/events"] = lambda req, body: httpx.Response(200, json=usage)
    server.hooks["/api/v1/billing/usage/checkpoints/current"] = lambda req, body: httpx.Response(200, json=storage)
    rest = service.create_rest_client()

    got = rest.get_billing_usage("2026-07-13T00:00:00Z", datetime(2026, 7, 14, tzinfo=UTC)).result(timeout=10)
    assert isinstance(got.data[0].event_info, types.SamplingPrefillBillingEvent) and got.data[0].event_info.cached
    assert got.sessions["s"].user_metadata == {"a": "b"}
    params = server.calls("/api/v1/billing/usage/events")[0].url.params
    assert (params["starting_on"], params["ending_before"]) == ("2026-07-13T00:00:00Z", "2026-07-14T00:00:00Z")
    with pytest.raises(ValueError):
        rest.get_billing_usage("not a time", "2026-07-14T00:00:00Z")

    current = asyncio.run(rest.get_current_checkpoint_storage_usage_async("p"))
    assert current.data[0].checkpoint_count == 2 and current.effective_rate_usd_per_gigabyte_month is None
    assert server.calls("/api/v1/billing/usage/checkpoints/current")[0].url.params["project_id"] == "p"
    rest.get_current_checkpoint_storage_usage().result(timeout=10)
    assert "project_id" not in server.calls("/api/v1/billing/usage/checkpoints/current")[1].url.params
    assert not server.calls("/api/v1/create_session")
