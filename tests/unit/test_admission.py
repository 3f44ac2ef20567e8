"""Admission by cost, through the real routers: what no worker could run is refused with 413 before it is queued.

A server with small budgets (a 64-token training pass, a 256-token decode batch) on tiny Kimi K2, no workers:
- a datum longer than one pass, and a request with more tokens than 8 passes, get 413 `request_too_large` naming
  the field and the limit, and nothing is queued; a request at the limits is queued;
- a Tinker sample whose samples × (prompt + max_tokens) exceed the decode batch gets 413; an OpenAI request whose
  n × max_tokens alone exceed it too;
- `get_server_capabilities` reports the same limits, and the official tinker SDK parses that response;
- ops refused at the door never wedge their run: the next op the client numbered still runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import build_state, create_app
from api.db.jobs import claim_ready_jobs, complete_job
from api.db.keys import create_api_key
from api.db.models import Job
from contract.catalogue import TINY_KIMI_K2
from contract.settings import TRAIN_PASSES_PER_TICK, Settings
from tests.job_payloads import fb_input

PASS, KV = 64, 256


@pytest.fixture
def api(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path, base_models=["tiny-kimi-k2"], queue="external", train_token_budget=PASS, token_budget=KV
    )
    state = build_state(settings)
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    client = TestClient(create_app(state=state), headers={"X-API-Key": key})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": "tiny-kimi-k2"}
    assert client.post("/api/v1/create_model", json=body).status_code == 200
    yield client, state, f"{session_id}:train:0"


def queued(state) -> int:
    with state.reading() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))


def fb_request(model_id: str, seq_id: int, *lengths: int) -> dict:
    data = [datum for n in lengths for datum in fb_input(list(range(1, n + 2))).to_wire()["data"]]
    return {
        "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
        "model_id": model_id,
        "seq_id": seq_id,
    }


def forward_backward(client: TestClient, model_id: str, lengths: list[int], seq_id: int = 1):
    return client.post("/api/v1/forward_backward", json=fb_request(model_id, seq_id, *lengths))


def test_a_sequence_longer_than_a_training_pass_is_refused_before_it_is_queued(api) -> None:
    client, state, model_id = api
    before = queued(state)
    response = forward_backward(client, model_id, [8, PASS + 1])
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "data.1.model_input"
    assert f"at most {PASS} tokens per sequence" in error["message"]
    assert queued(state) == before

    too_many = forward_backward(client, model_id, [PASS] * TRAIN_PASSES_PER_TICK + [1])
    assert too_many.status_code == 413 and too_many.json()["error"]["param"] == "data"
    assert f"at most {PASS * TRAIN_PASSES_PER_TICK}" in too_many.json()["error"]["message"]
    assert queued(state) == before

    # seq 1 was taken by the refusals (`api/refusals.py`): the client numbers its next op 2
    assert forward_backward(client, model_id, [PASS] * TRAIN_PASSES_PER_TICK, seq_id=2).status_code == 200
    assert queued(state) == before + 1


def test_samples_that_cannot_fit_one_decode_batch_are_refused(api) -> None:
    client, state, _ = api
    before = queued(state)
    prompt = {"chunks": [{"type": "encoded_text", "tokens": list(range(1, 17))}]}
    sample = {"base_model": "tiny-kimi-k2", "prompt": prompt, "sampling_params": {"max_tokens": 16}}
    too_many = client.post("/api/v1/asample", json=sample | {"num_samples": KV // 32 + 1})
    assert too_many.status_code == 413 and too_many.json()["error"]["param"] == "num_samples"
    assert f"exceed the {KV} tokens one decode batch" in too_many.json()["error"]["message"]
    chat = {"model": "tiny-kimi-k2", "messages": [{"role": "user", "content": "hi"}], "n": 4, "max_tokens": KV // 4 + 1}
    refused = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 413 and refused.json()["error"]["param"] == "n"
    assert queued(state) == before
    assert client.post("/api/v1/asample", json=sample | {"num_samples": KV // 32}).status_code == 200


def test_capabilities_report_the_limits_admission_enforces(api) -> None:
    import tinker.types

    client, _, _ = api
    body = client.get("/api/v1/get_server_capabilities").json()
    (model,) = body["supported_models"]
    assert model["max_train_sequence_tokens"] == PASS and model["train_pass_tokens"] == PASS
    assert model["max_train_request_tokens"] == PASS * TRAIN_PASSES_PER_TICK
    assert model["estimated_train_pass_bytes"] == PASS * TINY_KIMI_K2.train_bytes_per_token
    assert model["sample_batch_tokens"] == KV
    parsed = tinker.types.GetServerCapabilitiesResponse.model_validate(body)
    assert parsed.supported_models[0].model_name == TINY_KIMI_K2.name


def test_refused_ops_never_wedge_the_run_the_client_numbered_them_in(api) -> None:
    """The SDK numbers a run's ops itself: ops refused at the door (by the body's types, by a route's checks, or
    by cost) each leave a failed placeholder at their seq_id, so the next op still runs."""
    client, state, model_id = api
    refused = [
        client.post(
            "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e30}}
        ),  # fmt: skip
        client.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 2, "path": ".."}),
        client.post("/api/v1/forward_backward", json=fb_request(model_id, 3, PASS + 1)),
    ]
    assert [r.status_code for r in refused] == [400, 400, 413]
    ok = client.post("/api/v1/forward_backward", json=fb_request(model_id, 4, 3))
    assert ok.status_code == 200
    with state.transaction() as session:  # a worker runs the create (seq 0) ...
        (create,) = claim_ready_jobs(session, base_models=[TINY_KIMI_K2.name], worker_id="w", lease_seconds=60, limit=8)
        assert complete_job(session, create.id, create.fencing_token, {"model_id": model_id})
    with state.transaction() as session:  # ... and then seq 4, past the three refusals
        (next_op,) = claim_ready_jobs(
            session, base_models=[TINY_KIMI_K2.name], worker_id="w", lease_seconds=60, limit=8
        )
    assert next_op.seq_id == 4

    failed = client.post("/api/v1/retrieve_future", json={"request_id": f"{model_id}:2"}).json()
    assert failed["category"] == "user" and "checkpoint name must match" in failed["error"]
    again = client.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 2, "path": "fixed"})
    assert again.status_code == 409 and "refused at submit" in again.json()["error"]["message"]  # seq 4 started


def test_an_op_sent_again_at_its_refused_seq_id_takes_that_place(api) -> None:
    """Loom's SDK does not use up a seq_id on a refusal: its next op comes with the same seq_id, and runs."""
    client, state, model_id = api
    assert (
        client.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 1, "path": ".."}).status_code == 400
    )
    with state.transaction() as session:  # the create (seq 0) runs; the run moves past the refused seq 1
        (create,) = claim_ready_jobs(session, base_models=[TINY_KIMI_K2.name], worker_id="w", lease_seconds=60, limit=8)
        assert complete_job(session, create.id, create.fencing_token, {"model_id": model_id})
    assert client.post("/api/v1/forward_backward", json=fb_request(model_id, 1, 3)).status_code == 200
    assert client.post("/api/v1/forward_backward", json=fb_request(model_id, 2, 3)).status_code == 200
    with state.transaction() as session:
        claimed = claim_ready_jobs(session, base_models=[TINY_KIMI_K2.name], worker_id="w", lease_seconds=60, limit=8)
    assert [job.seq_id for job in claimed] == [1, 2]
