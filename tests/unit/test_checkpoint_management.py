"""Checkpoint management and usage through the real app, in-process (`LOOM_QUEUE=external`: no model loads):
listing across runs, publish/unpublish, TTL and expiry, copy_weights, usage figures (the audit log: test_audit_log.py).

Checkpoints are real folders in the app's local store, recorded as a worker records them; jobs are real job-store
rows finished by hand, with the results a worker stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import build_state, create_app
from api.db.checkpoints import CheckpointRecord, record_checkpoint, storage_key, sweep_expired_checkpoints
from api.db.jobs import submit_job
from api.db.keys import create_api_key
from api.db.models import Checkpoint, CheckpointKind, ClientSession, JobState
from api.db.types import utcnow
from api.deps import AppState
from contract.checkpoint_store import MANIFEST, CheckpointCorrupt, configured_checkpoint_store
from contract.jobs import (
    CheckpointTarget,
    ForwardBackwardJob,
    ForwardJob,
    SampleJob,
    SaveWeightsJob,
    TinkerPrompt,
)
from contract.settings import Settings
from loom.types import ModelInput, SamplingParams
from tests.job_payloads import fb_input

BASE = "tiny-kimi-k2"
BASE_NAME = "loom/tiny-kimi-k2"
"""What the catalogue calls BASE (runs and jobs record this name)."""
KINDS = {
    "weights": CheckpointKind.TRAINING,
    "sampler_weights": CheckpointKind.SAMPLER,
    "external_weights": CheckpointKind.EXTERNAL,
}
"""A tinker path's kind segment -> the kind of checkpoint it names."""


@dataclass
class Door:
    state: AppState
    app: object
    alice: TestClient
    bob: TestClient

    def run(self, client: TestClient, model_seq_id: int = 0, session_id: str | None = None) -> str:
        """A new training run of `client`'s tenant (in a new session unless `session_id` is given)."""
        session_id = session_id or client.post("/api/v1/create_session", json={}).json()["session_id"]
        created = client.post(
            "/api/v1/create_model",
            json={
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "base_model": BASE,
                "lora_config": {"rank": 4},
            },
        )
        assert created.status_code == 200, created.text
        return f"{session_id}:train:{model_seq_id}"

    def checkpoint(self, owner: str, run_id: str, name: str, kind: str = "weights", ephemeral: bool = False) -> str:
        """Store a checkpoint folder and record it as a worker does; returns its tinker path."""
        checkpoint_id = f"{kind}/{name}"

        def fill(folder: Path) -> None:
            (folder / "adapter_model.safetensors").write_bytes(hashlib.sha256(checkpoint_id.encode()).digest() * 64)
            (folder / "adapter_config.json").write_text('{"r": 4}')

        store = configured_checkpoint_store(self.state.settings)
        uri, size = store.write(owner, run_id, storage_key(checkpoint_id, 1, 1), fill)
        path = f"tinker://{run_id}/{checkpoint_id}"
        record = CheckpointRecord(
            run_id=run_id,
            owner=owner,
            checkpoint_id=checkpoint_id,
            kind=KINDS[kind],
            tinker_path=path,
            storage_uri=uri,
            size_bytes=size,
            ttl_seconds=None,
            ephemeral=ephemeral,
        )
        with self.state.transaction() as session:
            record_checkpoint(session, record)
        return path

    def row(self, path: str) -> Checkpoint | None:
        with self.state.reading() as session:
            return session.scalar(select(Checkpoint).where(Checkpoint.tinker_path == path))

    def files(self, path: str) -> dict[str, bytes]:
        """The verified files of the checkpoint at `path`, read through the app's store (local or S3)."""
        folder = configured_checkpoint_store(self.state.settings).open(self.row(path).storage_uri)
        return {f.name: f.read_bytes() for f in folder.iterdir() if f.name != MANIFEST}

    def stored(self, uri: str) -> bool:
        try:
            configured_checkpoint_store(self.state.settings).open(uri)
        except CheckpointCorrupt:  # no manifest: deleted
            return False
        return True


def open_door(settings: Settings) -> Iterator[Door]:
    """The app on `settings` (external queue) with two tenants' clients."""
    state = build_state(settings)
    with state.transaction() as session:
        _, alice_key = create_api_key(session, "alice", "test")
        _, bob_key = create_api_key(session, "bob", "test")
    app = create_app(state=state)
    with (
        TestClient(app, headers={"X-API-Key": alice_key}) as alice,
        TestClient(app, headers={"X-API-Key": bob_key}) as bob,
    ):
        yield Door(state, app, alice, bob)


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external"))


def rest_url(path: str, suffix: str = "") -> str:
    run_id, checkpoint_id = path.removeprefix("tinker://").split("/", 1)
    return f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}{suffix}"


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- listing ------------------------------------------------------------------------------------------------------


def test_user_checkpoints_are_listed_across_runs_newest_first_with_a_cursor(door: Door) -> None:
    first, second = door.run(door.alice), door.run(door.alice)
    paths = [
        door.checkpoint("alice", first, "a"),
        door.checkpoint("alice", second, "b", kind="sampler_weights"),
        door.checkpoint("alice", first, "c"),
    ]
    door.checkpoint("alice", first, "snapshot", kind="sampler_weights", ephemeral=True)
    expired = door.checkpoint("alice", second, "old")
    with door.state.transaction() as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.tinker_path == expired)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    theirs = door.checkpoint("bob", door.run(door.bob), "theirs")

    page = door.alice.get("/api/v1/checkpoints", params={"limit": 2}).json()
    assert [c["tinker_path"] for c in page["checkpoints"]] == paths[::-1][:2]
    assert page["cursor"] == {"offset": 0, "limit": 2, "total_count": 3}
    assert page["checkpoints"][1]["checkpoint_type"] == "sampler"
    rest = door.alice.get("/api/v1/checkpoints", params={"limit": 2, "offset": 2}).json()
    assert [c["tinker_path"] for c in rest["checkpoints"]] == paths[:1]
    # the per-run listing hides the expired and the hidden ones too
    listed = door.alice.get(f"/api/v1/training_runs/{second}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in listed] == [paths[1]]
    assert [c["tinker_path"] for c in door.bob.get("/api/v1/checkpoints").json()["checkpoints"]] == [theirs]


def test_each_listed_run_shows_its_newest_listed_checkpoint_of_each_kind(door: Door) -> None:
    both, sampler_only, bare = door.run(door.alice), door.run(door.alice), door.run(door.alice)
    door.checkpoint("alice", both, "old")
    newest = door.checkpoint("alice", both, "new")
    sampler = door.checkpoint("alice", both, "s", kind="sampler_weights")
    door.checkpoint("alice", both, "snapshot", kind="sampler_weights", ephemeral=True)  # hidden: never shown
    only = door.checkpoint("alice", sampler_only, "s", kind="sampler_weights")
    door.checkpoint("bob", door.run(door.bob), "theirs")

    listed = door.alice.get("/api/v1/training_runs").json()["training_runs"]
    last = {
        r["training_run_id"]: (
            (r.get("last_checkpoint") or {}).get("tinker_path"),
            (r.get("last_sampler_checkpoint") or {}).get("tinker_path"),
        )
        for r in listed
    }
    assert last == {both: (newest, sampler), sampler_only: (None, only), bare: (None, None)}
    one = door.alice.get(f"/api/v1/training_runs/{both}").json()
    assert (one["last_checkpoint"]["tinker_path"], one["last_sampler_checkpoint"]["tinker_path"]) == last[both]


# -- publish / unpublish ------------------------------------------------------------------------------------------


def test_publishing_lets_every_tenant_read_and_only_the_owner_change_it(door: Door) -> None:
    sampler = door.checkpoint("alice", door.run(door.alice), "shared", kind="sampler_weights")
    training = door.checkpoint("alice", door.run(door.alice), "state")
    bob_session = door.bob.post("/api/v1/create_session", json={}).json()["session_id"]
    weights_info = {"tinker_path": sampler}
    assert error(door.bob.post("/api/v1/weights_info", json=weights_info), 404)["code"] == "not_found"

    published = door.alice.post(rest_url(sampler, "/publish"))
    assert published.status_code == 200 and published.json()["public"] is True
    assert error(door.alice.post(rest_url(sampler, "/publish")), 409)["code"] == "conflict"
    assert door.alice.post(rest_url(training, "/publish")).status_code == 200

    assert door.bob.post("/api/v1/weights_info", json=weights_info).json()["base_model"] == BASE_NAME
    create = {"session_id": bob_session, "sampling_session_seq_id": 0, "model_path": sampler}
    sampler_id = door.bob.post("/api/v1/create_sampling_session", json=create).json()["sampling_session_id"]
    sample = {
        "sampling_session_id": sampler_id,
        "seq_id": 0,
        "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2},
    }
    assert door.bob.post("/api/v1/asample", json=sample).status_code == 200
    load = {"session_id": bob_session, "model_seq_id": 3, "path": training, "optimizer": False}
    assert door.bob.post("/api/v1/load_weights", json=load).status_code == 200
    # a published checkpoint is not listed as the reader's own
    assert door.bob.get("/api/v1/checkpoints").json()["checkpoints"] == []

    for mutation in (
        door.bob.post(rest_url(sampler, "/publish")),
        door.bob.delete(rest_url(sampler, "/publish")),
        door.bob.put(rest_url(sampler, "/ttl"), json={"ttl_seconds": 7200}),
        door.bob.delete(rest_url(sampler)),
    ):
        assert error(mutation, 404)["code"] == "not_found"
    assert door.row(sampler).public and door.row(sampler).expires_at is None

    unpublished = door.alice.delete(rest_url(sampler, "/publish"))
    assert unpublished.status_code == 200 and unpublished.json()["public"] is False
    assert error(door.alice.delete(rest_url(sampler, "/publish")), 409)["code"] == "conflict"
    assert error(door.bob.post("/api/v1/weights_info", json=weights_info), 404)["code"] == "not_found"
    # the reader's existing sampling session stops at its next sample
    assert error(door.bob.post("/api/v1/asample", json={**sample, "seq_id": 1}), 404)["code"] == "not_found"
    assert door.alice.post("/api/v1/weights_info", json=weights_info).status_code == 200


def test_accessible_scope_shows_another_tenants_run_through_its_published_checkpoints_only(door: Door) -> None:
    run_id = door.run(door.alice)
    shared = door.checkpoint("alice", run_id, "shared", kind="sampler_weights")
    door.checkpoint("alice", run_id, "private-sampler", kind="sampler_weights")
    door.checkpoint("alice", run_id, "private-state")
    accessible = {"access_scope": "accessible"}
    assert error(door.bob.get(f"/api/v1/training_runs/{run_id}", params=accessible), 404)["code"] == "not_found"
    assert door.bob.get("/api/v1/training_runs", params=accessible).json()["training_runs"] == []

    assert door.alice.post(rest_url(shared, "/publish")).status_code == 200
    seen = door.bob.get(f"/api/v1/training_runs/{run_id}", params=accessible).json()
    assert seen["training_run_id"] == run_id and seen["model_owner"] == "alice"
    assert seen["last_sampler_checkpoint"]["tinker_path"] == shared and seen.get("last_checkpoint") is None
    listed = door.bob.get("/api/v1/training_runs", params=accessible).json()
    assert [r["training_run_id"] for r in listed["training_runs"]] == [run_id]
    # the owned scope (the default) still answers 404, and the owner sees every checkpoint
    assert error(door.bob.get(f"/api/v1/training_runs/{run_id}"), 404)["code"] == "not_found"
    own = door.alice.get(f"/api/v1/training_runs/{run_id}", params=accessible).json()
    assert own["last_sampler_checkpoint"]["tinker_path"] != shared and own.get("last_checkpoint") is not None
    bad = door.bob.get(f"/api/v1/training_runs/{run_id}", params={"access_scope": "everything"})
    assert bad.status_code == 400, bad.text


def test_a_malformed_checkpoint_in_a_rest_url_is_400(door: Door) -> None:
    run_id = door.run(door.alice)
    bad = door.alice.post(f"/api/v1/training_runs/{run_id}/checkpoints/recovery/x/publish")
    assert error(bad, 400)["param"] == "checkpoint_id"


# -- TTL and expiry -----------------------------------------------------------------------------------------------


def test_ttl_sets_and_clears_expiry_and_an_expired_checkpoint_is_gone_then_swept(door: Door) -> None:
    path = door.checkpoint("alice", door.run(door.alice), "ttl")
    before = utcnow()
    set_ttl = door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": 7200})
    assert set_ttl.status_code == 200, set_ttl.text
    listed = door.alice.get("/api/v1/checkpoints").json()["checkpoints"][0]
    expires = datetime.fromisoformat(listed["expires_at"])
    assert before + timedelta(seconds=7200) <= expires <= utcnow() + timedelta(seconds=7200)
    assert error(door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": 60}), 400)["param"] == "ttl_seconds"
    assert error(door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": 10**10}), 400)["param"] == "ttl_seconds"
    assert door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": None}).status_code == 200
    assert "expires_at" not in door.alice.get("/api/v1/checkpoints").json()["checkpoints"][0]

    uri = door.row(path).storage_uri
    with door.state.transaction() as session:
        session.execute(
            update(Checkpoint).where(Checkpoint.tinker_path == path).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert error(door.alice.post("/api/v1/weights_info", json={"tinker_path": path}), 404)["code"] == "not_found"
    assert error(door.alice.put(rest_url(path, "/ttl"), json={"ttl_seconds": 7200}), 404)["code"] == "not_found"
    assert door.alice.get("/api/v1/checkpoints").json()["checkpoints"] == []
    assert door.stored(uri)  # gone for clients, not yet swept

    assert sweep_expired_checkpoints(door.state.sessions) == 1
    assert door.row(path) is None and not door.stored(uri)


# -- copy_weights -------------------------------------------------------------------------------------------------


def test_copy_weights_copies_the_files_into_a_new_run_of_the_caller(door: Door) -> None:
    source_run = door.run(door.alice)
    source = door.checkpoint("alice", source_run, "orig")
    body = {"source_path": source, "destination_project_id": "proj-archive", "ttl_seconds": 7200}
    response = door.alice.post("/api/v1/copy_weights", json=body, headers={"X-Idempotency-Key": "k1"})
    assert response.status_code == 200, response.text
    copy = response.json()["tinker_path"]
    copy_run = copy.removeprefix("tinker://").split("/")[0]
    assert copy.endswith("/weights/orig") and copy_run != source_run and copy_run.endswith(":train:0")
    assert door.files(copy) == door.files(source)
    assert door.row(copy).storage_uri != door.row(source).storage_uri
    listed = {c["tinker_path"]: c for c in door.alice.get("/api/v1/checkpoints").json()["checkpoints"]}
    assert listed[copy]["user_metadata"] == {"copied_from": source} and listed[copy]["expires_at"]
    assert listed[copy]["size_bytes"] == listed[source]["size_bytes"]
    run = door.alice.get(f"/api/v1/training_runs/{copy_run}").json()
    assert run["user_metadata"] == {"copied_from": source} and run["last_checkpoint"]["tinker_path"] == copy
    with door.state.reading() as session:
        assert session.get(ClientSession, copy_run.split(":")[0]).project_id == "proj-archive"

    # a retry of the same request (same idempotency key) answers the same copy instead of copying again
    again = door.alice.post("/api/v1/copy_weights", json=body, headers={"X-Idempotency-Key": "k1"})
    assert again.json()["tinker_path"] == copy
    assert len(door.alice.get("/api/v1/checkpoints").json()["checkpoints"]) == 2
    other = door.checkpoint("alice", source_run, "other")
    reused = door.alice.post(
        "/api/v1/copy_weights", json={**body, "source_path": other}, headers={"X-Idempotency-Key": "k1"}
    )
    assert error(reused, 409)["code"] == "conflict"

    # the copy is the caller's own: it outlives its source, and its run cannot be trained
    assert door.alice.delete(rest_url(source)).status_code == 200
    assert door.alice.post("/api/v1/weights_info", json={"tinker_path": copy}).status_code == 200
    fb = {"forward_backward_input": fb_input([1, 2, 3]).to_wire(), "model_id": copy_run, "seq_id": 1}
    assert error(door.alice.post("/api/v1/forward_backward", json=fb), 409)["code"] == "conflict"


def test_copy_weights_into_a_run_slot_of_a_session(door: Door) -> None:
    source = door.checkpoint("alice", door.run(door.alice), "orig", kind="sampler_weights")
    session_id = door.alice.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"source_path": source, "session_id": session_id, "model_seq_id": 7}
    copy = door.alice.post("/api/v1/copy_weights", json=body).json()["tinker_path"]
    assert copy == f"tinker://{session_id}:train:7/sampler_weights/orig"
    assert door.alice.post("/api/v1/copy_weights", json=body).json()["tinker_path"] == copy  # replay
    door.run(door.alice, model_seq_id=8, session_id=session_id)
    taken = door.alice.post("/api/v1/copy_weights", json={**body, "model_seq_id": 8})
    assert error(taken, 409)["param"] == "model_seq_id"

    bob_session = door.bob.post("/api/v1/create_session", json={}).json()["session_id"]
    into_bobs = door.alice.post("/api/v1/copy_weights", json={**body, "session_id": bob_session})
    assert error(into_bobs, 404)["code"] == "not_found"
    for bad, param in (
        ({"source_path": source}, "destination_project_id"),
        ({"source_path": source, "session_id": session_id}, "session_id"),
        ({**body, "destination_project_id": "p"}, "session_id"),
        ({**body, "model_seq_id": 9, "ttl_seconds": 5}, "ttl_seconds"),
        ({"source_path": "tinker://nope", "destination_project_id": "p"}, "source_path"),
    ):
        assert error(door.alice.post("/api/v1/copy_weights", json=bad), 400)["param"] == param


def test_another_tenant_copies_only_a_published_checkpoint_and_owns_the_copy(door: Door) -> None:
    source = door.checkpoint("alice", door.run(door.alice), "orig")
    body = {"source_path": source, "destination_project_id": "bobs"}
    assert error(door.bob.post("/api/v1/copy_weights", json=body), 404)["code"] == "not_found"
    door.alice.post(rest_url(source, "/publish"))
    copy = door.bob.post("/api/v1/copy_weights", json=body).json()["tinker_path"]
    assert door.row(copy).owner == "bob" and not door.row(copy).public
    assert [c["tinker_path"] for c in door.bob.get("/api/v1/checkpoints").json()["checkpoints"]] == [copy]
    door.alice.delete(rest_url(source, "/publish"))
    assert door.bob.post("/api/v1/weights_info", json={"tinker_path": copy}).status_code == 200


# -- usage --------------------------------------------------------------------------------------------------------


def finish(
    door: Door, owner: str, model_id: str | None, seq_id: int | None, payload, result: dict, at: datetime
) -> None:
    """A job as the job store holds it once a worker finished it at `at`."""
    with door.state.transaction() as session:
        job, _ = submit_job(
            session, owner=owner, base_model=BASE_NAME, model_id=model_id, seq_id=seq_id, payload=payload
        )
        job.state, job.result, job.finished_at = JobState.DONE.value, result, at


def test_usage_counts_finished_tokens_saves_and_stored_bytes(door: Door) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    run_id = door.run(door.alice)
    session_id = run_id.split(":")[0]
    with door.state.transaction() as session:
        session.get(ClientSession, session_id).user_metadata = {"team": "rl"}
    finish(door, "alice", run_id, 1, ForwardBackwardJob(input=fb_input(list(range(10)))), {}, hour)  # 9 tokens
    finish(door, "alice", run_id, 2, ForwardJob(input=fb_input(list(range(5)))), {}, hour)  # 4 tokens
    target = CheckpointTarget(checkpoint_id="weights/s", tinker_path=f"tinker://{run_id}/weights/s")
    finish(door, "alice", run_id, 3, SaveWeightsJob(target=target), {"path": target.tinker_path}, hour)
    sampler = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE}
    sampler_id = door.alice.post("/api/v1/create_sampling_session", json=sampler).json()["sampling_session_id"]
    prompt = TinkerPrompt(model_input=ModelInput.from_ints([1, 2, 3, 4, 5, 6]))
    sample = SampleJob(prompt=prompt, sampling_params=SamplingParams(max_tokens=3), num_samples=2)
    result = {
        "type": "sample",
        "prompt_cache_hit_tokens": 4,
        "sequences": [{"tokens": [7, 8, 9], "stop_reason": "length"}, {"tokens": [7], "stop_reason": "stop"}],
    }
    finish(door, "alice", sampler_id, 0, sample, result, hour + timedelta(minutes=59))
    finish(door, "alice", run_id, 4, ForwardJob(input=fb_input(list(range(9)))), {}, hour + timedelta(hours=1))
    with door.state.transaction() as session:  # failed requests count nothing
        payload = ForwardBackwardJob(input=fb_input(list(range(50))))
        job, _ = submit_job(session, owner="alice", base_model=BASE_NAME, model_id=run_id, seq_id=5, payload=payload)
        job.state, job.finished_at = JobState.FAILED.value, hour
    bob_run = door.run(door.bob)
    finish(door, "bob", bob_run, 1, ForwardBackwardJob(input=fb_input(list(range(30)))), {}, hour)
    stored = door.checkpoint("alice", run_id, "kept")
    with door.state.transaction() as session:  # stored since half an hour before the window
        session.execute(
            update(Checkpoint).where(Checkpoint.tinker_path == stored).values(created_at=hour - timedelta(minutes=30))
        )
    size = door.row(stored).size_bytes

    window = {"starting_on": hour.isoformat(), "ending_before": (hour + timedelta(hours=1)).isoformat()}
    usage = door.alice.get("/api/v1/billing/usage/events", params=window).json()
    events = {(e["event_info"]["type"], e["event_info"].get("cached")): e for e in usage["data"]}
    quantities = {key: e["event_info"] for key, e in events.items()}
    assert quantities == {
        ("training", None): {"type": "training", "token_count": 13},
        ("checkpoint", None): {"type": "checkpoint", "count": 1},
        ("sampling_prefill", False): {"type": "sampling_prefill", "cached": False, "token_count": 2},
        ("sampling_prefill", True): {"type": "sampling_prefill", "cached": True, "token_count": 4},
        ("sampling_sample", None): {"type": "sampling_sample", "token_count": 4},
        ("storage", None): {"type": "storage", "free": False, "gigabyte_hours": pytest.approx(size / 1e9)},
    }
    for key, event in events.items():
        assert datetime.fromisoformat(event["bucket_start"]) == hour and event["base_model"] == BASE_NAME
        assert event["user_id"] == "alice" and "estimated_cost_usd" not in event  # Loom has no prices
        assert event.get("session_id") == (None if key[0] == "storage" else session_id)
    assert usage["sessions"] == {session_id: {"user_metadata": {"team": "rl"}}}
    bob = door.bob.get("/api/v1/billing/usage/events", params=window).json()["data"]
    assert [e["event_info"] for e in bob] == [{"type": "training", "token_count": 29}]

    current = door.alice.get("/api/v1/billing/usage/checkpoints/current").json()
    assert current == {
        "data": [{"org_user_urn": "alice", "checkpoint_count": 1, "size_bytes": size, "size_gigabytes": size / 1e9}]
    }
    assert door.alice.get("/api/v1/billing/usage/checkpoints/current", params={"project_id": "x"}).json() == {
        "data": []
    }


def test_usage_per_run_counts_its_training_saves_samples_of_its_weights_and_stored_bytes(door: Door) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    first, second = door.run(door.alice), door.run(door.alice)
    finish(door, "alice", first, 1, ForwardBackwardJob(input=fb_input(list(range(10)))), {}, hour)  # 9 tokens
    finish(door, "alice", second, 1, ForwardBackwardJob(input=fb_input(list(range(5)))), {}, hour)  # 4 tokens
    target = CheckpointTarget(checkpoint_id="weights/s", tinker_path=f"tinker://{second}/weights/s")
    finish(door, "alice", second, 2, SaveWeightsJob(target=target), {"path": target.tinker_path}, hour)
    finish(door, "alice", first, 2, ForwardJob(input=fb_input(list(range(9)))), {}, hour + timedelta(hours=1))
    weights = door.checkpoint("alice", first, "for-sampling", kind="sampler_weights")
    prompt = TinkerPrompt(model_input=ModelInput.from_ints([1, 2, 3, 4, 5, 6]))
    result = {
        "type": "sample",
        "prompt_cache_hit_tokens": 4,
        "sequences": [{"tokens": [7, 8, 9], "stop_reason": "length"}, {"tokens": [7], "stop_reason": "stop"}],
    }
    for seq_id, uri in enumerate((door.row(weights).storage_uri, None)):  # the base model's sample is no run's
        sample = SampleJob(prompt=prompt, sampling_params=SamplingParams(max_tokens=3), num_samples=2, storage_uri=uri)
        finish(door, "alice", f"{first.split(':')[0]}:sample:0", seq_id, sample, result, hour)
    bob_run = door.run(door.bob)
    finish(door, "bob", bob_run, 1, ForwardBackwardJob(input=fb_input(list(range(30)))), {}, hour)

    window = {"starting_on": hour.isoformat(), "ending_before": (hour + timedelta(hours=1)).isoformat()}
    runs = door.alice.get("/api/v1/billing/usage/runs", params=window).json()["runs"]
    zero = {
        "training_tokens": 0,
        "sampling_prefill_tokens": 0,
        "sampling_prefill_cached_tokens": 0,
        "sampling_sample_tokens": 0,
        "checkpoints_saved": 0,
        "stored_bytes": 0,
    }
    sampled = {"sampling_prefill_tokens": 2, "sampling_prefill_cached_tokens": 4, "sampling_sample_tokens": 4}
    assert runs == [
        {
            "training_run_id": first,
            "base_model": BASE_NAME,
            "session_id": first.split(":")[0],
            **zero,
            "training_tokens": 9,
            **sampled,
            "stored_bytes": door.row(weights).size_bytes,
        },
        {
            "training_run_id": second,
            "base_model": BASE_NAME,
            "session_id": second.split(":")[0],
            **zero,
            "training_tokens": 4,
            "checkpoints_saved": 1,
        },
    ]
    bob = door.bob.get("/api/v1/billing/usage/runs", params=window).json()["runs"]
    assert [(r["training_run_id"], r["training_tokens"]) for r in bob] == [(bob_run, 29)]


@pytest.mark.parametrize(
    ("window", "param"),
    [
        ({"starting_on": "2026-01-01T00:30:00Z", "ending_before": "2026-01-01T02:00:00Z"}, "starting_on"),
        ({"starting_on": "2026-01-01T00:00:00Z", "ending_before": "2026-01-01T02:00:01Z"}, "ending_before"),
        ({"starting_on": "2026-01-01T00:00:00Z", "ending_before": "2026-01-01T00:00:00Z"}, "ending_before"),
        ({"starting_on": "2026-01-01T00:00:00Z", "ending_before": "2026-01-16T00:00:00Z"}, "ending_before"),
        ({"starting_on": "2999-01-01T00:00:00Z", "ending_before": "2999-01-02T00:00:00Z"}, "starting_on"),
        ({"starting_on": "yesterday", "ending_before": "2026-01-02T00:00:00Z"}, "starting_on"),
        ({"ending_before": "2026-01-02T00:00:00Z"}, "starting_on"),
    ],
)
def test_usage_windows_are_whole_past_hours_at_most_14_days_long(door: Door, window: dict, param: str) -> None:
    for route in ("/api/v1/billing/usage/events", "/api/v1/billing/usage/runs"):
        assert error(door.alice.get(route, params=window), 400)["param"] == param


def test_every_job_kind_has_a_usage_rule() -> None:
    """A new job kind must be placed in (or deliberately kept out of) the usage figures."""
    from api.usage import CHECKPOINT_KINDS, TRAINING_KINDS
    from contract.jobs import JobKind

    counted = {*TRAINING_KINDS, *CHECKPOINT_KINDS, JobKind.SAMPLE}
    free = {JobKind.CREATE_MODEL, JobKind.OPTIM_STEP, JobKind.LOAD_WEIGHTS, JobKind.UNLOAD_MODEL}
    assert counted | free == set(JobKind) and not counted & free
