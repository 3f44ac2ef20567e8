"""`GET /api/v1/queue` through the real app (`LOOM_QUEUE=external`, so nothing runs the jobs): the caller's own
pending requests with the count of queued requests ahead of each (other tenants' included, never named), a leased
one as running, the live registered workers (a silent one left out) and the served base models."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from api.db.models import Job, JobState, Worker
from api.db.types import utcnow
from api.db.workers import register_worker
from contract.settings import Settings
from tests.unit.test_admission import fb_request
from tests.unit.test_checkpoint_management import BASE, BASE_NAME, Door, error, open_door


@pytest.fixture
def door(tmp_path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, base_models=[BASE], queue="external", worker_dead_seconds=30))


def test_the_queue_shows_my_requests_the_count_ahead_and_live_workers(door: Door) -> None:
    bob_run = door.run(door.bob)
    alice_run = door.run(door.alice)
    door.alice.post("/api/v1/forward_backward", json=fb_request(alice_run, 1, 5))
    with door.state.transaction() as session:
        register_worker(session, "w-live", "train", [BASE_NAME], "q1")
        register_worker(session, "w-dead", "sample", [BASE_NAME], "q2")
        session.execute(update(Job).where(Job.id == f"{alice_run}:0").values(state=JobState.LEASED.value))
        session.execute(
            update(Worker).where(Worker.id == "w-dead").values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )

    view = door.alice.get("/api/v1/queue").json()
    assert [(r["request_id"], r["state"], r["ahead"]) for r in view["requests"]] == [
        (f"{alice_run}:0", "leased", 0),
        (f"{alice_run}:1", "queued", 1),  # bob's create_model is queued before it
    ]
    assert view["requests"][1]["kind"] == "forward_backward" and view["requests"][1]["model_id"] == alice_run
    assert [w["id"] for w in view["workers"]] == ["w-live"] and view["workers"][0]["role"] == "train"
    assert view["base_models"] == [BASE_NAME]
    assert [r["model_id"] for r in door.bob.get("/api/v1/queue").json()["requests"]] == [bob_run]
    assert error(door.alice.get("/api/v1/queue", params={"limit": 0}), 400)["param"] == "limit"
