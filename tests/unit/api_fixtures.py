"""An in-process Loom API for unit tests: the real app with `LOOM_QUEUE=external` (nothing loads a model, so every
submitted job stays queued until a test moves it), and per-tenant clients; `commit_checkpoint` stores a checkpoint as
a worker commits one.

`LoomApi.lease` and `LoomApi.finish_job` play a worker: they lease one queued job and record its result or failure
through the real job store, so tests control exactly when each request completes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.db.checkpoints import CheckpointRecord, record_checkpoint
from api.db.jobs import complete_job, fail_job
from api.db.keys import create_api_key
from api.db.models import CheckpointKind, ErrorCategory, Job, JobState
from api.db.types import utcnow
from api.deps import AppState
from contract.checkpoint_store import CheckpointStore
from contract.settings import Settings

BASE = "tiny-kimi-k2"


def commit_checkpoint(
    transaction: Callable[[], AbstractContextManager[Any]],
    store: CheckpointStore,
    run_id: str,
    checkpoint_id: str,
    kind: CheckpointKind,
    fill: Callable[[Path], Any],
    *,
    location: str | None = None,
    ttl_seconds: int | None = None,
    overwrite: bool = False,
) -> str:
    """A checkpoint of alice's run as a worker commits one: `fill` writes its files into `store` (at `location`,
    default the checkpoint id), then its row is recorded in a `transaction()`; returns its storage URI."""
    uri, size = store.write("alice", run_id, location or checkpoint_id, fill)
    record = CheckpointRecord(
        run_id=run_id,
        owner="alice",
        checkpoint_id=checkpoint_id,
        kind=kind,
        tinker_path=f"tinker://{run_id}/{checkpoint_id}",
        storage_uri=uri,
        size_bytes=size,
        ttl_seconds=ttl_seconds,
        ephemeral=False,
        overwrite=overwrite,
    )
    with transaction() as session:
        record_checkpoint(session, record)
    return uri


@dataclass
class LoomApi:
    state: AppState
    app: Any
    keys: dict[str, str]

    def client(self, owner: str = "alice") -> TestClient:
        if owner not in self.keys:
            with self.state.transaction() as session:
                _, self.keys[owner] = create_api_key(session, owner, f"{owner}'s key")
        return TestClient(self.app, headers={"X-API-Key": self.keys[owner]})

    def lease(self, job_id: str) -> int:
        """Hand `job_id` to a fake worker, as a claim would; returns its fencing token."""
        with self.state.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == JobState.QUEUED.value
            job.state, job.lease_owner, job.started_at = JobState.LEASED.value, "fake-worker", utcnow()
            job.lease_expires_at = utcnow() + timedelta(minutes=10)
            job.fencing_token += 1
            return job.fencing_token

    def finish_job(self, job_id: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        token = self.lease(job_id)
        with self.state.transaction() as session:
            if error is None:
                assert complete_job(session, job_id, token, result or {})
            else:
                assert fail_job(session, job_id, token, error, ErrorCategory.USER)


@pytest.fixture
def loom_api(tmp_path: Path) -> LoomApi:
    state = build_state(Settings(data_dir=tmp_path, base_models=[BASE], queue="external", long_poll_seconds=0.2))
    return LoomApi(state, create_app(state=state), {})


def new_session(client: TestClient, **fields: Any) -> str:
    response = client.post("/api/v1/create_session", json=fields)
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


def new_run(client: TestClient, session_id: str, model_seq_id: int = 0) -> str:
    body = {"session_id": session_id, "model_seq_id": model_seq_id, "base_model": BASE, "lora_config": {"rank": 4}}
    response = client.post("/api/v1/create_model", json=body)
    assert response.status_code == 200, response.text
    return response.json()["model_id"]


def new_sampler(client: TestClient, session_id: str, seq: int = 0) -> str:
    body = {"session_id": session_id, "sampling_session_seq_id": seq, "base_model": BASE}
    response = client.post("/api/v1/create_sampling_session", json=body)
    assert response.status_code == 200, response.text
    return response.json()["sampling_session_id"]


def sample(client: TestClient, sampler_id: str, seq_id: int) -> str:
    body = {
        "sampling_session_id": sampler_id,
        "seq_id": seq_id,
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2},
    }
    response = client.post("/api/v1/asample", json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]
