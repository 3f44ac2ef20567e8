"""One tenant must never hurt another: tenant B trains and samples while tenant A sends every hostile request.

B ("victim") drives the official tinker SDK: forward_backward + optim_step + greedy samples from its latest
weights, 4 steps. It does so once alone (the reference), then again from the same seed while A ("mallory", raw
HTTP on the same server) loops over hostile requests in a thread: values past 64 bits, huge TTLs and seeds,
path-like checkpoint names, sparse tensors with bad indices or a huge shape, deep JSON, a sequence longer than a
training pass, compressed bodies, far-ahead seq_ids, bad page sizes, a number as OpenAI text, and requests that do
reach the worker: per-token PPO clip thresholds, an adapter driven hard (learning rate 10) and sampled.

Checked: B's losses equal the reference (rtol 1e-4) and its greedy samples are identical; every refused hostile
request got a JSON 4xx with a request id; every one the server accepted ended done or as a `user` failure, never
a server error; the server stays healthy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from examples.sl_loop import make_datum
from tests.e2e.server import LoomServer
from tests.e2e.wire import SMOL, datum, fb_body, new_run, result

pytestmark = pytest.mark.e2e

STEPS = 4


def victim(tokenizer, seed: int = 11) -> tuple[list[float], list[list[list[int]]]]:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=SMOL, rank=4, seed=seed).result()
    batch = [make_datum(tokenizer, "Capital of France?", "Paris."), make_datum(tokenizer, "Capital of Peru?", "Lima.")]
    prompt = types.ModelInput.from_ints(tokenizer.encode("Q: Capital of Peru?\nA:"))
    losses, samples = [], []
    for _ in range(STEPS):
        losses.append(training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
        samples.append([list(s.tokens) for s in out.sequences])
    return losses, samples


def sparse(shape: list[int], crow: list[int], cols: list[int], data: list[int]) -> dict[str, Any]:
    return {
        "data": data,
        "dtype": "int64",
        "shape": shape,
        "sparse_crow_indices": crow,
        "sparse_col_indices": cols,
    }


def with_targets(tokens: list[int], targets: dict[str, Any]) -> dict[str, Any]:
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "loss_fn_inputs": {"target_tokens": targets}}  # fmt: skip


def nested(depth: int) -> str:
    return '{"model_id": "x", "seq_id": 1, "forward_backward_input": ' + "[" * depth + "]" * depth + "}"


def refused_requests(run: str, session_id: str) -> list[tuple[str, Callable[[httpx.Client], httpx.Response]]]:
    """(name, send) of requests that must be refused at the door with a JSON 4xx."""
    big = 2**63
    tokens = [1, 2, 3]
    return [
        (
            "ttl overflow",
            lambda h: h.post(
                "/api/v1/save_weights", json={"model_id": run, "seq_id": 1, "path": "t", "ttl_seconds": 10**18}
            ),
        ),  # fmt: skip
        (
            "seed 2**64 asample",
            lambda h: h.post(
                "/api/v1/asample",
                json={
                    "base_model": SMOL,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
                    "sampling_params": {"max_tokens": 2, "seed": 2**64},
                },
            ),
        ),  # fmt: skip
        (
            "seed 2**64 chat",
            lambda h: h.post(
                "/v1/chat/completions",
                json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 2**64},
            ),
        ),  # fmt: skip
        (
            "learning rate 1e30",
            lambda h: h.post(
                "/api/v1/optim_step", json={"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 1e30}}
            ),
        ),  # fmt: skip
        (
            "8192-token sequence",
            lambda h: h.post("/api/v1/forward_backward", json=fb_body(run, 1, [datum(list(range(1, 8193)))])),
        ),  # fmt: skip
        (
            "checkpoint name ..",
            lambda h: h.post("/api/v1/save_weights_for_sampler", json={"model_id": run, "seq_id": 1, "path": ".."}),
        ),  # fmt: skip
        (
            "checkpoint name .",
            lambda h: h.post("/api/v1/save_weights", json={"model_id": run, "seq_id": 1, "path": "."}),
        ),  # fmt: skip
        (
            "model_seq_id 2**63",
            lambda h: h.post(
                "/api/v1/create_model", json={"session_id": session_id, "model_seq_id": big, "base_model": SMOL}
            ),
        ),  # fmt: skip
        (
            "seq_id 2**63",
            lambda h: h.post("/api/v1/optim_step", json={"model_id": run, "seq_id": big, "adam_params": {}}),
        ),  # fmt: skip
        (
            "lora seed 2**63",
            lambda h: h.post(
                "/api/v1/create_model",
                json={
                    "session_id": session_id,
                    "model_seq_id": 7,
                    "base_model": SMOL,
                    "lora_config": {"rank": 4, "seed": big},
                },
            ),
        ),  # fmt: skip
        ("offset 2**63", lambda h: h.get("/api/v1/training_runs", params={"offset": big})),
        ("limit -1", lambda h: h.get("/api/v1/training_runs", params={"limit": -1})),
        ("limit 10**8", lambda h: h.get("/api/v1/training_runs", params={"limit": 10**8})),
        (
            "deep JSON",
            lambda h: h.post(
                "/api/v1/forward_backward", content=nested(1000), headers={"content-type": "application/json"}
            ),
        ),  # fmt: skip
        (
            "sparse column out of range",
            lambda h: h.post(
                "/api/v1/forward_backward",
                json=fb_body(run, 1, [with_targets(tokens, sparse([3, 4], [0, 1, 2, 3], [9, 0, 1], [1, 2, 3]))]),
            ),
        ),  # fmt: skip
        (
            "sparse negative column",
            lambda h: h.post(
                "/api/v1/forward_backward",
                json=fb_body(run, 1, [with_targets(tokens, sparse([3, 4], [0, 1, 2, 3], [-1, 0, 1], [1, 2, 3]))]),
            ),
        ),  # fmt: skip
        (
            "sparse decreasing rows",
            lambda h: h.post(
                "/api/v1/forward_backward",
                json=fb_body(run, 1, [with_targets(tokens, sparse([3, 4], [0, 2, 1, 3], [0, 1, 2], [1, 2, 3]))]),
            ),
        ),  # fmt: skip
        (
            "sparse huge shape",
            lambda h: h.post(
                "/api/v1/forward_backward",
                json=fb_body(
                    run, 1, [with_targets(tokens, sparse([3, 5_000_000], [0, 1, 2, 3], [0, 1, 2], [1, 2, 3]))]
                ),
            ),
        ),  # fmt: skip
        (
            "seq_id far ahead",
            lambda h: h.post("/api/v1/optim_step", json={"model_id": run, "seq_id": 10**9, "adam_params": {}}),
        ),  # fmt: skip
        (
            "zstd body",
            lambda h: h.post(
                "/api/v1/forward_backward",
                content=b"\x28\xb5\x2f\xfd" + bytes(64),
                headers={"content-type": "application/x-protobuf", "content-encoding": "zstd"},
            ),
        ),  # fmt: skip
        (
            "OpenAI text is a number",
            lambda h: h.post(
                "/v1/chat/completions",
                json={
                    "model": SMOL,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                    "max_tokens": 2,
                },
            ),
        ),  # fmt: skip
    ]


def accepted_requests(http: httpx.Client, run: str, next_seq: Callable[[], int], sampler_seq: int) -> list[str]:
    """Hostile requests that pass the door and reach the worker; returns their request ids. `next_seq` numbers the
    run's ops (without gaps: an op after a gap waits for it), `sampler_seq` names this round's sampling session."""
    tokens = list(range(20, 36))
    ppo = datum(tokens, logprobs=[-1.0] * 16, advantages=[1.0] * 16, clip_high_threshold=[1.2] * 16)
    ids = [http.post("/api/v1/forward_backward", json=fb_body(run, next_seq(), [ppo], loss_fn="ppo")).json()]
    for _ in range(3):  # drive the adapter hard, then sample it
        ids.append(http.post("/api/v1/forward_backward", json=fb_body(run, next_seq(), [datum(tokens)])).json())
        ids.append(http.post("/api/v1/optim_step", json={"model_id": run, "seq_id": next_seq(), "adam_params": {"learning_rate": 10.0}}).json())  # fmt: skip
    save = {"model_id": run, "seq_id": next_seq(), "sampling_session_seq_id": sampler_seq}
    saved = result(http, http.post("/api/v1/save_weights_for_sampler", json=save).json()["request_id"])
    if "sampling_session_id" in saved:
        sample = {"sampling_session_id": saved["sampling_session_id"], "seq_id": 0, "num_samples": 4}
        sample |= {"prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "sampling_params": {"max_tokens": 8, "seed": 3}}  # fmt: skip
        ids.append(http.post("/api/v1/asample", json=sample).json())
    return [future["request_id"] for future in ids]


def test_a_hostile_tenant_changes_nothing_for_another(
    tinker_env: LoomServer, other_tenant_key: str, tokenizer_of
) -> None:
    reference = victim(tokenizer_of(SMOL))

    problems: list[str] = []
    done = threading.Event()

    def hostile() -> None:
        headers = {"X-API-Key": other_tenant_key}
        with httpx.Client(base_url=tinker_env.url, headers=headers, timeout=120) as http:
            session_id = http.post("/api/v1/create_session", json={}).json()["session_id"]
            run = new_run(http, session_id=session_id)
            seq = iter(range(1, 10**6))
            rounds = 0
            while not done.is_set() or rounds == 0:
                for name, send in refused_requests(run, session_id):
                    response = send(http)
                    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None  # fmt: skip
                    if not (400 <= response.status_code < 500 and body and "error" in body):
                        problems.append(f"{name}: {response.status_code} {response.text[:200]}")
                    elif "x-request-id" not in response.headers:
                        problems.append(f"{name}: no x-request-id")
                for request_id in accepted_requests(http, run, lambda: next(seq), rounds):
                    final = result(http, request_id)
                    if "error" in final and final.get("category") != "user":
                        problems.append(f"accepted request {request_id} failed as {final.get('category')}: {final}")
                rounds += 1

    thread = threading.Thread(target=hostile, daemon=True)
    thread.start()
    try:
        under_attack = victim(tokenizer_of(SMOL))
    finally:
        done.set()
        thread.join(600)
    assert not thread.is_alive(), "the hostile tenant's loop did not finish"
    assert problems == []
    assert under_attack[1] == reference[1]
    assert under_attack[0] == pytest.approx(reference[0], rel=1e-4)
    assert httpx.get(f"{tinker_env.url}/api/v1/healthz").status_code == 200
