"""`GET /api/v1/training_runs/{run_id}/metrics` through the real app, in-process (external queue, no model): the
run's finished forward_backward and optim_step results grouped into steps, averaged per step, in the run's order;
unfinished and failed requests left out; another tenant's run answers 404 exactly like a missing one."""

from __future__ import annotations

from typing import Any

from api.db.jobs import submit_job
from contract.jobs import JobKind
from tests.job_payloads import payload
from tests.unit.api_fixtures import BASE, LoomApi, loom_api, new_run, new_session

__all__ = ["loom_api"]


def _submit(api: LoomApi, run_id: str, seq_id: int, kind: JobKind) -> str:
    with api.state.transaction() as session:
        job, _ = submit_job(
            session, owner="alice", base_model=BASE, model_id=run_id, seq_id=seq_id, payload=payload(kind, seq_id)
        )
        return job.id


def _finish(api: LoomApi, run_id: str, seq_id: int, kind: JobKind, metrics: dict[str, float]) -> None:
    result: dict[str, Any] = {"metrics": metrics}
    if kind == JobKind.FORWARD_BACKWARD:
        result |= {"loss_fn_output_type": "cross_entropy", "loss_fn_outputs": [{"logprobs": {"data": [0.5]}}]}
    api.finish_job(_submit(api, run_id, seq_id, kind), result)


def test_points_are_steps_of_finished_requests_in_the_runs_order(loom_api: LoomApi) -> None:
    alice = loom_api.client("alice")
    run_id = new_run(alice, new_session(alice))
    fb, optim = JobKind.FORWARD_BACKWARD, JobKind.OPTIM_STEP
    _finish(loom_api, run_id, 1, fb, {"loss:sum": 4.0, "accuracy:mean": 0.25})
    _finish(loom_api, run_id, 2, fb, {"loss:sum": 2.0})  # gradient accumulation: same step, averaged
    _finish(loom_api, run_id, 3, optim, {"grad_norm": 1.5})
    _finish(loom_api, run_id, 4, fb, {"loss:sum": 1.0})
    _finish(loom_api, run_id, 5, optim, {})
    _finish(loom_api, run_id, 6, fb, {"loss:sum": 0.5})  # step 2 underway: its optim_step not sent yet
    queued = _submit(loom_api, run_id, 7, optim)
    failed = _submit(loom_api, run_id, 8, fb)
    loom_api.finish_job(failed, error="bad datum")

    answer = alice.get(f"/api/v1/training_runs/{run_id}/metrics")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["training_run_id"] == run_id
    assert [p["step"] for p in body["points"]] == [0, 1, 2]
    assert [p["metrics"] for p in body["points"]] == [
        {"loss:sum": 3.0, "accuracy:mean": 0.25, "grad_norm": 1.5},
        {"loss:sum": 1.0},
        {"loss:sum": 0.5},
    ]
    times = [p["time"] for p in body["points"]]
    assert times == sorted(times) and queued  # the queued optim_step adds nothing yet

    loom_api.finish_job(queued, {"metrics": {"grad_norm": 0.75}})
    last = alice.get(f"/api/v1/training_runs/{run_id}/metrics").json()["points"][-1]
    assert last == {**last, "step": 2, "metrics": {"loss:sum": 0.5, "grad_norm": 0.75}}


def test_a_run_without_finished_steps_has_no_points(loom_api: LoomApi) -> None:
    alice = loom_api.client("alice")
    run_id = new_run(alice, new_session(alice))
    _submit(loom_api, run_id, 1, JobKind.FORWARD_BACKWARD)
    assert alice.get(f"/api/v1/training_runs/{run_id}/metrics").json() == {"training_run_id": run_id, "points": []}


def test_another_tenants_run_answers_like_a_missing_one(loom_api: LoomApi) -> None:
    alice, bob = loom_api.client("alice"), loom_api.client("bob")
    run_id = new_run(alice, new_session(alice))
    _finish(loom_api, run_id, 1, JobKind.FORWARD_BACKWARD, {"loss:sum": 1.0})
    theirs = bob.get(f"/api/v1/training_runs/{run_id}/metrics")
    missing = bob.get("/api/v1/training_runs/no-such-run:train:0/metrics")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    assert alice.get("/api/v1/training_runs/x/metrics", headers={"X-API-Key": "tml-wrong"}).status_code == 401
