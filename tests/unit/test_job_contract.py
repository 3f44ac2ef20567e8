"""The API↔worker job contract, through the real routers, job store and worker (no server process).

- Requests posted to the Tinker routers become typed payloads: the run's LoRA defaults resolved once (rank 32,
  seed derived from the run id), `forward_backward` with `forward_only` is a `forward` job, checkpoints carry
  their resolved target, and a session sample carries its resolved checkpoint.
- `unload_model` (which Tinker does not number) takes the seq after the run's newest op: a `forward_backward`
  followed by `unload_model`, claimed and executed in ONE worker tick, both succeed, in that order. Before the
  contract the unload had no seq_id, ran before every chain of the tick, and the forward_backward failed with
  "not resident".
- Migration 0004 rewrites every payload stored in the old request-shaped form into one the contract parses (the
  same request, field for field), and its downgrade gives the old form back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, Table, insert, select, text

from api.app import build_state, create_app
from api.db.jobs import claimed
from api.db.keys import create_api_key
from api.db.models import Job
from api.db.session import alembic_config, make_engine, make_session_factory
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import (
    CreateModelJob,
    ForwardJob,
    JobKind,
    LoadWeightsJob,
    OptimStepJob,
    SampleJob,
    SaveWeightsForSamplerJob,
    SaveWeightsJob,
    TinkerPrompt,
    UnloadModelJob,
    default_lora_seed,
)
from contract.settings import Settings
from tests.job_payloads import fb_input
from tests.unit.worker_fixtures import fresh_model
from worker.consumer import Consumer
from worker.engine import Engine

BASE = "loom/tiny-kimi-k2"


@pytest.fixture
def api(tmp_path: Path):
    state = build_state(Settings(data_dir=tmp_path, base_models=["tiny-kimi-k2"], queue="external"))
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    client = TestClient(create_app(state=state), headers={"X-API-Key": key})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    yield client, state, session_id


def post(client: TestClient, path: str, body: dict) -> str:
    response = client.post(f"/api/v1/{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def fb_body(model_id: str, seq_id: int, **extra) -> dict:
    return {"forward_backward_input": fb_input([5, 6, 7, 8]).to_wire(), "model_id": model_id, "seq_id": seq_id} | extra


def stored(state, request_id: str):
    with state.reading() as session:
        return claimed(session.get_one(Job, request_id))


def test_routers_store_typed_payloads_with_every_default_resolved(api) -> None:
    client, state, session_id = api
    model_id = f"{session_id}:train:0"
    created = post(client, "create_model", {"session_id": session_id, "model_seq_id": 0, "base_model": "tiny-kimi-k2"})
    forward = post(client, "forward_backward", fb_body(model_id, 1, forward_only=True))
    step = post(client, "optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}})
    save = post(client, "save_weights", {"model_id": model_id, "seq_id": 3, "path": "s1", "ttl_seconds": 7200})
    snapshot = post(
        client, "save_weights_for_sampler", {"model_id": model_id, "seq_id": 4, "sampling_session_seq_id": 9}
    )

    create_job = stored(state, created)
    assert create_job.kind is JobKind.CREATE_MODEL and create_job.model_id == model_id
    assert isinstance(create_job.payload, CreateModelJob)
    assert (create_job.payload.lora.rank, create_job.payload.lora.seed) == (32, default_lora_seed(model_id))
    forward_job = stored(state, forward)
    assert forward_job.kind is JobKind.FORWARD and isinstance(forward_job.payload, ForwardJob)
    assert forward_job.payload.input == fb_input([5, 6, 7, 8])
    assert stored(state, step).payload == OptimStepJob.model_validate({"adam": {"learning_rate": 0.01}})
    save_job = stored(state, save).payload
    assert isinstance(save_job, SaveWeightsJob)
    assert (save_job.target.tinker_path, save_job.target.ttl_seconds) == (f"tinker://{model_id}/weights/s1", 7200)
    snapshot_job = stored(state, snapshot).payload
    assert isinstance(snapshot_job, SaveWeightsForSamplerJob) and snapshot_job.target.ephemeral
    assert snapshot_job.sampling_session_id == f"{session_id}:sample:9"


def test_unload_runs_after_the_runs_earlier_ops_in_one_tick(api, tmp_path: Path) -> None:
    client, state, session_id = api
    model_id = f"{session_id}:train:0"
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": "tiny-kimi-k2", "lora_config": {"rank": 4}}
    ids = [post(client, "create_model", body), post(client, "forward_backward", fb_body(model_id, 1))]
    ids.append(post(client, "unload_model", {"model_id": model_id}))
    unload = stored(state, ids[2])
    assert isinstance(unload.payload, UnloadModelJob) and unload.seq_id == 2
    assert (
        client.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": {}}).status_code
        == 409
    )

    worker = Consumer(
        Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "ckpt")),
        state.sessions,
        "w1",
        lease_seconds=600,
    )
    assert worker.tick() == 3  # all three in one claim and one execute

    results = [client.post("/api/v1/retrieve_future", json={"request_id": i}).json() for i in ids]
    assert results[0] == {"model_id": model_id, "type": "create_model"}
    assert results[1]["metrics"]["loss:sum"] > 0, results[1]
    assert results[2] == {"model_id": model_id, "type": "unload_model"}
    assert model_id not in worker.engine.pool.runs


def test_session_samples_carry_their_resolved_checkpoint(api, tmp_path: Path) -> None:
    client, state, session_id = api
    sampler = client.post(
        "/api/v1/create_sampling_session",
        json={"session_id": session_id, "sampling_session_seq_id": 0, "base_model": "tiny-kimi-k2"},
    ).json()["sampling_session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    request = post(
        client,
        "asample",
        {
            "sampling_session_id": sampler,
            "seq_id": 1,
            "prompt": prompt,
            "sampling_params": {"max_tokens": 3},
            "num_samples": 2,
            "prompt_logprobs": True,
        },
    )
    job = stored(state, request)
    assert (job.kind, job.model_id, job.seq_id) == (JobKind.SAMPLE, sampler, 1)
    assert isinstance(job.payload, SampleJob) and job.payload.storage_uri is None and job.payload.num_samples == 2
    assert job.payload.prompt == TinkerPrompt(model_input={"chunks": prompt["chunks"]}, prompt_logprobs=True)


# -- migration 0004 -----------------------------------------------------------------------------------------------

RUN = "s1:train:0"
FB = {"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": {}}]}
FB["loss_fn"] = "cross_entropy"
TARGET = {"checkpoint_id": "weights/a", "tinker_path": f"tinker://{RUN}/weights/a"}
OLD_ROWS = [  # (id, kind, model_id, seq_id, payload) as the routers stored them before the contract
    ("c", "create_model", RUN, 0, {"lora_config": {"rank": 8, "train_unembed": False}}),
    ("f", "forward_backward", RUN, 1, {"forward_backward_input": FB, "forward_only": True}),
    ("o", "optim_step", RUN, 2, {"adam_params": {"learning_rate": 0.5}}),
    ("s", "save_weights", RUN, 3, {"path": "a", "overwrite": True, "ttl_seconds": None, "resolved": TARGET}),
    ("u", "unload_model", RUN, None, {}),
    ("l", "create_model", "s1:train:1", 0, {"path": TARGET["tinker_path"], "optimizer": True, "resolved": {"storage_uri": "file:///a"}}),
    ("q", "sample", None, None, {"openai": {"kind": "chat", "messages": [{"role": "user", "content": "hi"}], "tools": None, "top_logprobs": 2, "stream": True}, "base_model": BASE, "num_samples": 3, "sampling_params": {"max_tokens": 5}, "resolved": {"storage_uri": None}}),
]  # fmt: skip


def test_migration_0004_converts_stored_payloads_both_ways(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0003")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO sessions (id, owner, tags, user_metadata, created_at, last_heartbeat_at) VALUES ('s1', 'alice', '[]', '{}', '2026-01-01', '2026-01-01')"))  # fmt: skip
        jobs_0003 = Table("jobs", MetaData(), autoload_with=connection)  # the table as revision 0003 left it
        for job_id, kind, model_id, seq_id, payload in OLD_ROWS:
            lane = "train" if kind != "sample" else "sample"
            connection.execute(
                insert(jobs_0003).values(
                    id=job_id, owner="alice", kind=kind, lane=lane, base_model=BASE, model_id=model_id,
                    seq_id=seq_id, payload=payload, state="done", attempt=1, fencing_token=1, created_at=utcnow(),
                )
            )  # fmt: skip
    command.upgrade(alembic_config(url), "head")  # through 0004, and the schema the ORM reads
    with make_session_factory(engine)() as session:
        jobs = {row.id: claimed(row) for row in session.scalars(select(Job))}

    create = jobs["c"].payload
    assert isinstance(create, CreateModelJob)
    assert create.lora.model_dump() == {
        "rank": 8, "seed": default_lora_seed(RUN), "train_attn": True, "train_mlp": True, "train_unembed": False,
        "train_vision": False,  # added after 0004: payloads stored before it read as False
    }  # fmt: skip
    assert jobs["f"].kind is JobKind.FORWARD and jobs["f"].payload.input.loss_fn == "cross_entropy"
    assert jobs["o"].payload.adam.learning_rate == 0.5
    assert jobs["s"].payload.target.model_dump(exclude_none=True) == TARGET | {"overwrite": True, "ephemeral": False}
    assert isinstance(jobs["u"].payload, UnloadModelJob) and jobs["u"].seq_id == 4
    load = jobs["l"]
    assert load.kind is JobKind.LOAD_WEIGHTS and load.payload == LoadWeightsJob(
        tinker_path=TARGET["tinker_path"], storage_uri="file:///a", with_optimizer=True
    )
    chat = jobs["q"].payload
    assert isinstance(chat, SampleJob) and (chat.num_samples, chat.sampling_params.max_tokens) == (3, 5)
    assert (chat.prompt.type, chat.prompt.stream, chat.prompt.top_logprobs) == ("chat", True, 2)

    command.downgrade(alembic_config(url), "0003")
    with engine.connect() as connection:
        rows = connection.execute(select(jobs_0003))
        back = {row.id: (row.kind, row.payload) for row in rows}
    assert back["f"] == ("forward", {"forward_backward_input": FB, "forward_only": True})
    assert back["o"] == ("optim_step", {"adam_params": {"learning_rate": 0.5}})
    assert back["l"] == ("create_model", OLD_ROWS[5][4])
    assert back["s"] == ("save_weights", OLD_ROWS[3][4])
    assert json.loads(json.dumps(back["q"][1]))["openai"]["messages"] == [{"role": "user", "content": "hi"}]
    engine.dispose()
