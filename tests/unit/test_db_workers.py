"""Worker registry and sticky placement on a migrated SQLite file (api/db/workers.py, claim_ready_jobs sticky).

Checked: a run's chain is claimed by one worker and then only by it; a sample-only worker never takes training
ops and vice versa; a worker silent past `dead_after` is reaped — its leases requeued, its runs unplaced, so
another worker claims them; a request whose worker died `max_attempts` times fails with a clear server error
(a poison request); `queued_work` names every destination that needs a wake-up; a clean deregistration hands
work back at once.
"""

from datetime import timedelta

from sqlalchemy import update

from api.db.jobs import claim_ready_jobs
from api.db.models import Job, TrainingRun, Worker
from api.db.types import utcnow
from api.db.workers import (
    Waiting,
    deregister_worker,
    heartbeat,
    queued_work,
    reap_dead_workers,
    register_worker,
)
from tests.unit.test_db_jobs import BASE, complete, load, submit

DEAD_AFTER = 10.0


def sticky_claim(factory, worker_id: str, role: str = "train") -> list:
    with factory.begin() as session:
        return claim_ready_jobs(
            session,
            base_models=[BASE],
            worker_id=worker_id,
            lease_seconds=600,
            limit=16,
            training=role != "sample",
            sampling=role != "train",
            sticky=True,
        )


def placed_on(factory, run_id: str) -> str | None:
    with factory() as session:
        return session.get(TrainingRun, run_id).worker_id


def register(factory, worker_id: str, role: str = "train") -> None:
    with factory.begin() as session:
        register_worker(session, worker_id, role, [BASE], f"loom.w.{worker_id}")


def silence(factory, worker_id: str) -> None:
    with factory.begin() as session:
        session.execute(
            update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )


def reap(factory) -> list[str]:
    with factory.begin() as session:
        return reap_dead_workers(session, utcnow(), DEAD_AFTER)


def test_runs_stick_to_their_first_claimer_until_it_is_reaped(session_factory, make_run) -> None:
    run = make_run()
    register(session_factory, "w1")
    register(session_factory, "w2")
    submit(session_factory, run, 1)
    assert [j.seq_id for j in sticky_claim(session_factory, "w1")] == [1]
    assert placed_on(session_factory, run) == "w1"
    submit(session_factory, run, 2)
    assert sticky_claim(session_factory, "w2") == []  # w2 may not take w1's run
    silence(session_factory, "w1")
    assert reap(session_factory) == ["w1"]
    assert placed_on(session_factory, run) is None
    job = load(session_factory, f"{run}:1")
    assert (job.state, job.lease_owner) == ("queued", None)  # w1's lease came back
    assert [j.seq_id for j in sticky_claim(session_factory, "w2")] == [1, 2]
    assert placed_on(session_factory, run) == "w2"
    with session_factory.begin() as session:
        assert heartbeat(session, "w2") and not heartbeat(session, "w1")  # w1 must register again


def test_roles_split_training_and_sampling_work(session_factory, make_run) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    submit(session_factory, "sampler-1", None, kind="sample")
    assert [j.kind for j in sticky_claim(session_factory, "s1", role="sample")] == ["sample"]
    assert [j.kind for j in sticky_claim(session_factory, "t1", role="train")] == ["forward_backward"]


def test_a_request_that_keeps_killing_workers_fails_after_three_attempts(session_factory, make_run) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    for attempt in (1, 2, 3):
        worker = f"w{attempt}"
        register(session_factory, worker)
        assert [j.seq_id for j in sticky_claim(session_factory, worker)] == [1]
        silence(session_factory, worker)
        assert reap(session_factory) == [worker]
    job = load(session_factory, f"{run}:1")
    assert (job.state, job.error_category, job.attempt) == ("failed", "server", 3)
    assert "lost 3 times" in job.error


def test_queued_work_names_every_destination(session_factory, make_run) -> None:
    placed, unplaced = make_run(), make_run(model_seq_id=1)
    register(session_factory, "w1")
    submit(session_factory, placed, 1)
    sticky_claim(session_factory, "w1")
    submit(session_factory, placed, 2)
    submit(session_factory, unplaced, 1)
    submit(session_factory, "sampler-1", None, kind="sample")
    with session_factory() as session:
        assert queued_work(session, utcnow() - timedelta(seconds=60)) == set()  # nothing waited that long
        waiting = queued_work(session, utcnow() + timedelta(seconds=1))
    assert waiting == {
        Waiting(BASE, sampling=False, worker_queue="loom.w.w1"),
        Waiting(BASE, sampling=False, worker_queue=None),
        Waiting(BASE, sampling=True, worker_queue=None),
    }


def test_clean_shutdown_hands_back_leases_without_spending_attempts(session_factory, make_run) -> None:
    run = make_run()
    register(session_factory, "w1")
    submit(session_factory, run, 1)
    sticky_claim(session_factory, "w1")
    with session_factory.begin() as session:
        deregister_worker(session, "w1")
    with session_factory() as session:
        job = session.get(Job, f"{run}:1")
        assert (job.state, job.lease_owner) == ("queued", None)
        assert session.get(TrainingRun, run).worker_id is None and session.get(Worker, "w1") is None


def test_a_worker_takes_on_one_new_run_per_claim(session_factory, make_run) -> None:
    runs = [make_run(model_seq_id=i) for i in range(3)]
    for run in runs:
        submit(session_factory, run, 1)
    first = sticky_claim(session_factory, "w1")
    second = sticky_claim(session_factory, "w2")
    assert len(first) == len(second) == 1 and first[0].model_id != second[0].model_id
    (third,) = set(runs) - {first[0].model_id, second[0].model_id}
    complete(session_factory, first[0])
    submit(session_factory, first[0].model_id, 2)
    again = sticky_claim(session_factory, "w1")  # its own run's next op, plus the one run still unplaced
    assert sorted((j.model_id, j.seq_id) for j in again) == sorted([(first[0].model_id, 2), (third, 1)])
