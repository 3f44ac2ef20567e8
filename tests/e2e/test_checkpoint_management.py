"""Checkpoint management and usage with the official `tinker` SDK (0.38) and its `tinker` CLI (`--format json`):
listing across runs, publish/unpublish as seen by another tenant (weights_info, sampling, OpenAI model names), TTL
and expiry (gone at once, swept from the store), copy_weights (the copy's files equal the source's and its weights
compute the same loss), and usage figures that match what was trained, sampled and stored.

Each test uses tenants of its own, so figures and listings hold only what the test did.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import select, update
from tinker import types

from api.db.models import Checkpoint
from api.db.session import make_engine, make_session_factory
from contract.checkpoint_store import MANIFEST
from tests.e2e.server import LoomServer, create_key

pytestmark = pytest.mark.e2e

KIMI = "loom/tiny-kimi-k2"
TOKENS = list(range(100, 112))
_tenants = itertools.count()


def tenant(server: LoomServer, name: str) -> str:
    """The API key of a new tenant (unique per call, so shared-server state never leaks into a test)."""
    return create_key(server.data_dir, f"{name}-{next(_tenants)}-{os.getpid()}")


def cli(server: LoomServer, key: str, *args: str) -> subprocess.CompletedProcess:
    """The official `tinker` command, as `key`'s tenant, with JSON output."""
    env = os.environ | {"TINKER_BASE_URL": server.url, "TINKER_API_KEY": key}
    program = Path(sys.executable).with_name("tinker")
    return subprocess.run(
        [str(program), "--format", "json", *args], env=env, capture_output=True, text=True, timeout=120
    )


def cli_json(server: LoomServer, key: str, *args: str):
    done = cli(server, key, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def database(server: LoomServer):
    return make_session_factory(make_engine(f"sqlite:///{server.data_dir / 'loom.db'}"))


def row(server: LoomServer, path: str) -> Checkpoint | None:
    with database(server)() as session:
        return session.scalar(select(Checkpoint).where(Checkpoint.tinker_path == path))


def stored_files(server: LoomServer, path: str) -> dict[str, bytes]:
    folder = Path(row(server, path).storage_uri.removeprefix("file://"))
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.name != MANIFEST}


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def trained(service: tinker.ServiceClient, seed: int):
    training = service.create_lora_training_client(base_model=KIMI, rank=4, train_unembed=False, seed=seed).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return training


def test_listing_publishing_ttl_and_deletion_with_the_sdk_and_the_cli(tinker_env: LoomServer) -> None:
    server = tinker_env
    alice, mallory = tenant(server, "alice"), tenant(server, "mallory")
    service = tinker.ServiceClient(api_key=alice)
    first, second = trained(service, 1), trained(service, 2)
    state = first.save_state("e2e-state").result().path
    weights = second.save_weights_for_sampler("e2e-sampler").result().path
    rest = tinker.RestClient(api_key=alice)

    listed = rest.list_user_checkpoints().result()
    assert [c.tinker_path for c in listed.checkpoints] == [weights, state]
    assert listed.cursor.total_count == 2 and listed.checkpoints[0].checkpoint_type == "sampler"
    assert [c["tinker_path"] for c in cli_json(server, alice, "checkpoint", "list")["checkpoints"]] == [weights, state]
    first_run = state.removeprefix("tinker://").split("/")[0]
    by_run = cli_json(server, alice, "checkpoint", "list", "--run-id", first_run)["checkpoints"]
    assert [c["tinker_path"] for c in by_run] == [state]
    assert cli_json(server, alice, "checkpoint", "info", state)["public"] is False

    # published: every tenant reads it (weights_info, sampling, OpenAI model name); only the owner changes it
    cli_json(server, alice, "checkpoint", "publish", weights)
    assert rest.list_user_checkpoints().result().checkpoints[0].public
    theirs = tinker.RestClient(api_key=mallory)
    assert theirs.get_weights_info_by_tinker_path(weights).result().base_model == KIMI
    reader = tinker.ServiceClient(api_key=mallory)
    sampler = reader.create_sampling_client(model_path=weights).result()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    assert len(sampler.sample(prompt, 1, params).result().sequences[0].tokens) == 2
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": weights, "prompt": TOKENS[:4], "max_tokens": 2},
        headers={"Authorization": f"Bearer {mallory}"},
        timeout=120,
    )
    assert completion.status_code == 200, completion.text
    for change in (
        lambda: theirs.publish_checkpoint_from_tinker_path(weights).result(),
        lambda: theirs.unpublish_checkpoint_from_tinker_path(weights).result(),
        lambda: theirs.set_checkpoint_ttl_from_tinker_path(weights, 7200).result(),
        lambda: theirs.delete_checkpoint_from_tinker_path(weights).result(),
    ):
        with pytest.raises(tinker.NotFoundError):
            change()
    refused = cli(server, mallory, "checkpoint", "unpublish", weights)
    assert refused.returncode != 0 and "not found" in (refused.stdout + refused.stderr).lower()
    # publishing twice is a 409, as Tinker documents (asked over plain HTTP: the SDK retries a 409 for 5 minutes)
    run_id, checkpoint_id = weights.removeprefix("tinker://").split("/", 1)
    again = httpx.post(
        f"{server.url}/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish",
        headers={"X-API-Key": alice},
        timeout=30,
    )
    assert again.status_code == 409, again.text

    # unpublished: private again, at once, also for the reader's open sampling session
    rest.unpublish_checkpoint_from_tinker_path(weights).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.get_weights_info_by_tinker_path(weights).result()
    with pytest.raises(tinker.NotFoundError):
        sampler.sample(prompt, 1, params).result()

    # TTL: set, shown, refused out of range, cleared
    before = datetime.now(UTC)
    cli_json(server, alice, "checkpoint", "set-ttl", state, "--ttl", "7200")
    expires = cli_json(server, alice, "checkpoint", "info", state)["expires_at"]
    assert before + timedelta(seconds=7200) <= datetime.fromisoformat(expires) <= datetime.now(UTC) + timedelta(hours=2)
    too_short = cli(server, alice, "checkpoint", "set-ttl", state, "--ttl", "60")
    assert too_short.returncode != 0 and "ttl_seconds" in too_short.stdout + too_short.stderr
    cli_json(server, alice, "checkpoint", "set-ttl", state, "--remove")
    assert rest.list_user_checkpoints().result().checkpoints[1].expires_at is None

    # expired (its TTL passed): gone for clients at once, then swept from the store with its row
    folder = Path(row(server, state).storage_uri.removeprefix("file://"))
    with database(server).begin() as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.tinker_path == state)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(state).result()
    assert [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints] == [weights]
    gc = subprocess.run(
        [sys.executable, "-m", "api.cli", "gc"],
        env=os.environ | {"LOOM_DATA_DIR": str(server.data_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gc.returncode == 0, gc.stderr
    assert row(server, state) is None and not folder.exists()

    deleted = cli_json(server, alice, "checkpoint", "delete", weights, "--yes")
    assert deleted == {"deleted_count": 1, "failed": []}
    assert cli_json(server, alice, "checkpoint", "list")["checkpoints"] == []


def test_copy_weights_makes_an_independent_checkpoint_with_the_same_weights(tinker_env: LoomServer) -> None:
    server = tinker_env
    alice, mallory = tenant(server, "alice"), tenant(server, "mallory")
    service = tinker.ServiceClient(api_key=alice)
    source = trained(service, 3).save_state("e2e-source").result().path
    rest = tinker.RestClient(api_key=alice)

    copy = rest.copy_weights(source, "proj-archive", ttl_seconds=7200).result()
    assert copy != source and copy.endswith("/weights/e2e-source")
    assert stored_files(server, copy) == stored_files(server, source)
    listed = {c.tinker_path: c for c in rest.list_user_checkpoints().result().checkpoints}
    assert listed[copy].user_metadata == {"copied_from": source} and listed[copy].expires_at is not None
    copy_run = rest.get_training_run_by_tinker_path(copy).result()
    assert copy_run.base_model == KIMI and copy_run.lora_rank == 4
    in_project = tinker.ServiceClient(api_key=alice, project_id="proj-other").copy_weights(source).result()
    assert in_project not in (copy, source)

    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(api_key=mallory).copy_weights(source, "theirs").result()

    # the copy holds the same weights and Adam state, and outlives its source
    loss = service.create_training_client_from_state(source).result().forward([datum()], "cross_entropy")
    expected = loss.result().metrics["loss:sum"]
    rest.delete_checkpoint_from_tinker_path(source).result()
    restored = service.create_training_client_from_state_with_optimizer(copy).result()
    assert restored.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(expected)


def test_usage_matches_what_was_trained_sampled_and_stored(tinker_env: LoomServer) -> None:
    server = tinker_env
    key = tenant(server, "usage")
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    service = tinker.ServiceClient(api_key=key)
    training = trained(service, 4)  # one forward_backward of len(TOKENS) - 1 tokens
    training.forward([datum(), datum()], "cross_entropy").result()
    trained_tokens = 3 * (len(TOKENS) - 1)
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(TOKENS[:5])
    sampled = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, temperature=1.0, seed=5)).result()
    training.save_state("e2e-usage").result()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)

    admin = tinker.AdminClient(api_key=key)
    usage = admin.get_billing_usage(start, end).result()
    totals: dict[str, float] = {}
    for event in usage.data:
        match event.event_info:
            case types.StorageBillingEvent() as info:
                quantity: float = info.gigabyte_hours
            case types.CheckpointBillingEvent() as info:
                quantity = info.count
            case info:
                quantity = info.token_count
        totals[info.type] = totals.get(info.type, 0) + quantity
        assert event.estimated_cost_usd is None and event.base_model == KIMI
    assert totals["training"] == trained_tokens
    assert totals["sampling_prefill"] == len(TOKENS[:5])
    assert totals["sampling_sample"] == sum(len(s.tokens) for s in sampled.sequences)
    assert totals["checkpoint"] == 2  # the sampling snapshot and the saved state
    assert totals["storage"] > 0
    session_ids = {event.session_id for event in usage.data if event.event_info.type != "storage"}
    assert session_ids == set(usage.sessions) and len(session_ids) == 1

    stored = tinker.RestClient(api_key=key).list_user_checkpoints().result().checkpoints
    storage = admin.get_current_checkpoint_storage_usage().result()
    assert [(item.checkpoint_count, item.size_bytes) for item in storage.data] == [
        (len(stored), sum(c.size_bytes for c in stored))
    ]
    window = (start.isoformat().replace("+00:00", "Z"), end.isoformat().replace("+00:00", "Z"))
    tokens_and_saves = [e.model_dump(mode="json") for e in usage.data if e.event_info.type != "storage"]
    from_cli = cli_json(server, key, "billing", "usage", *window)["data"]  # storage has grown since: left out
    assert [e for e in from_cli if e["event_info"]["type"] != "storage"] == tokens_and_saves
    assert cli_json(server, key, "billing", "checkpoint-storage")["data"] == [
        item.model_dump(mode="json") for item in storage.data
    ]
