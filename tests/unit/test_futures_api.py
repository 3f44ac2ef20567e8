"""Futures management through the real app: `cancel_future`, `retrieve_futures` and `join_sampling_session`.

Jobs never run by themselves here (`LOOM_QUEUE=external`); the tests lease and finish them through the job store,
so every state a request can be in when it is cancelled or polled is reached deterministically.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from api.db.models import Job, TrainingRun
from loom.types.futures import CLONE_SEQ_BLOCK
from tests.unit.api_fixtures import LoomApi, loom_api, new_run, new_sampler, new_session, sample

__all__ = ["loom_api"]


def optim_step(client, model_id: str, seq_id: int) -> str:
    body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 1e-3}}
    response = client.post("/api/v1/optim_step", json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def retrieve(client, request_id: str) -> dict:
    response = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
    assert response.status_code == 200, response.text
    return response.json()


def cancel(client, request_id: str) -> dict:
    response = client.post("/api/v1/cancel_future", json={"request_id": request_id})
    assert response.status_code == 200, response.text
    return response.json()


def test_cancel_fails_a_queued_sample_and_leaves_running_and_final_ones(loom_api: LoomApi) -> None:
    client = loom_api.client()
    sampler = new_sampler(client, new_session(client))
    queued, running, done = (sample(client, sampler, seq) for seq in range(3))
    loom_api.lease(running)
    loom_api.finish_job(done, {"sequences": []})

    answer = cancel(client, queued)
    assert answer["cancelled"] is True and answer["state"] == "failed"
    assert cancel(client, queued)["cancelled"] is True  # a repeated cancel answers like the first
    failed = retrieve(client, queued)
    assert failed["error"] == "cancelled by the client before it started" and failed["category"] == "user"

    assert cancel(client, running) | {"message": ""} == {
        "request_id": running,
        "cancelled": False,
        "state": "running",
        "message": "",
    }
    assert "not interrupt" in cancel(client, running)["message"]
    assert cancel(client, done)["state"] == "done"
    assert retrieve(client, done) == {"sequences": []}


def test_a_cancelled_ordered_op_does_not_wedge_its_run(loom_api: LoomApi) -> None:
    client = loom_api.client()
    model_id = new_run(client, new_session(client))
    loom_api.finish_job(f"{model_id}:0", {"model_id": model_id})
    first, second, third = (optim_step(client, model_id, seq) for seq in (1, 2, 3))

    assert cancel(client, second)["cancelled"] is True  # the run still waits for seq 1
    loom_api.finish_job(first, {"metrics": {}})
    with loom_api.state.reading() as session:
        assert session.get(TrainingRun, model_id).next_seq_id == 3  # past the cancelled seq 2
    assert cancel(client, third)["cancelled"] is True  # the run waits exactly for it: it moves on at once
    with loom_api.state.reading() as session:
        assert session.get(TrainingRun, model_id).next_seq_id == 4
    fourth = optim_step(client, model_id, 4)
    loom_api.finish_job(fourth, {"metrics": {}})
    assert retrieve(client, fourth) == {"metrics": {}}


def test_another_tenants_future_is_not_found(loom_api: LoomApi) -> None:
    alice, mallory = loom_api.client(), loom_api.client("mallory")
    request_id = sample(alice, new_sampler(alice, new_session(alice)), 0)
    assert mallory.post("/api/v1/cancel_future", json={"request_id": request_id}).status_code == 404
    assert mallory.post("/api/v1/cancel_future", json={"request_id": "nope"}).status_code == 404
    assert cancel(alice, request_id)["cancelled"] is True


def poll(client, sampler_id: str, cursor: int = 0, clone: int = 0, timeout: float = 0) -> dict:
    target = {"sampling_session_id": sampler_id, "cloned_sampler_id": clone}
    response = client.post(
        "/api/v1/retrieve_futures", json={"target": target, "prev_cursor": cursor, "timeout": timeout}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_retrieve_futures_reports_each_completion_once(loom_api: LoomApi) -> None:
    client = loom_api.client()
    sampler = new_sampler(client, new_session(client))
    a, b, c = (sample(client, sampler, seq) for seq in range(3))
    assert poll(client, sampler)["completions"] == []

    loom_api.finish_job(b, {"sequences": []})
    loom_api.finish_job(a, error="bad prompt")
    first = poll(client, sampler)
    assert first["completions"] == [{"state": "finished", "request_id": b}, {"state": "failed", "request_id": a}]
    again = poll(client, sampler, first["cursor"])
    assert again == {"completions": [], "cursor": first["cursor"]}

    loom_api.finish_job(c, {"sequences": []})
    last = poll(client, sampler, first["cursor"], timeout=5)
    assert last["completions"] == [{"state": "finished", "request_id": c}]
    assert poll(client, sampler, last["cursor"])["completions"] == []


def test_a_completion_that_becomes_visible_late_is_reported_again(loom_api: LoomApi) -> None:
    """A worker stamps finished_at before it commits: a completion older than the cursor can appear after it."""
    client = loom_api.client()
    sampler = new_sampler(client, new_session(client))
    early, late = sample(client, sampler, 0), sample(client, sampler, 1)
    loom_api.finish_job(early, {"sequences": []})
    cursor = poll(client, sampler)["cursor"]
    loom_api.finish_job(late, {"sequences": []})
    with loom_api.state.transaction() as session:  # stamped before `early`, committed after the poll saw it
        stamped = session.get(Job, early).finished_at - timedelta(milliseconds=1)
        session.execute(update(Job).where(Job.id == late).values(finished_at=stamped))

    reported = poll(client, sampler, cursor)
    assert {c["request_id"] for c in reported["completions"]} == {early, late}
    assert poll(client, sampler, reported["cursor"])["completions"] == []


def test_retrieve_futures_keeps_clones_apart_and_tenants_out(loom_api: LoomApi) -> None:
    client = loom_api.client()
    sampler = new_sampler(client, new_session(client))
    own = sample(client, sampler, 5)
    cloned = sample(client, sampler, 2 * CLONE_SEQ_BLOCK + 5)
    loom_api.finish_job(own, {"sequences": []})
    loom_api.finish_job(cloned, {"sequences": []})
    assert [c["request_id"] for c in poll(client, sampler)["completions"]] == [own]
    assert [c["request_id"] for c in poll(client, sampler, clone=2)["completions"]] == [cloned]
    assert poll(client, sampler, clone=1)["completions"] == []

    mallory = loom_api.client("mallory")
    target = {"sampling_session_id": sampler}
    assert mallory.post("/api/v1/retrieve_futures", json={"target": target}).status_code == 404
    bad_clone = {"target": {"sampling_session_id": sampler, "cloned_sampler_id": CLONE_SEQ_BLOCK}}
    assert client.post("/api/v1/retrieve_futures", json=bad_clone).status_code == 400


def test_join_sampling_session_hands_out_distinct_clone_ids(loom_api: LoomApi) -> None:
    client = loom_api.client()
    session_id = new_session(client)
    sampler = new_sampler(client, session_id)

    def join(c) -> object:
        return c.post("/api/v1/join_sampling_session", json={"sampling_session_id": sampler})

    assert [join(client).json()["client_counter"] for _ in range(3)] == [1, 2, 3]
    assert join(loom_api.client("mallory")).status_code == 404
    listed = client.get(f"/api/v1/sessions/{session_id}").json()["sampler_ids"]
    assert listed == [sampler]  # the clones are not samplers of their own
    client.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}})
    assert join(client).status_code == 410
