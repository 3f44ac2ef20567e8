"""Job store behaviour on a migrated SQLite file: ordering, replay, fencing, leases, scoping."""

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import (
    JobConflict,
    RetryPolicy,
    claim_ready_jobs,
    claimed,
    complete_job,
    fail_job,
    get_job,
    queue_position,
    release_expired_leases,
    submit_job,
)
from api.db.models import Job, TrainingRun
from api.db.types import utcnow
from contract.jobs import ClaimedJob, ForwardBackwardJob, JobPayload, OptimStepJob, UnreadablePayload
from tests.job_payloads import fb_input, payload

BASE = "tiny-kimi-k2"
LEASE_SECONDS = 60

Factory = sessionmaker[Session]


def submit(
    factory: Factory,
    model_id: str | None,
    seq_id: int | None,
    *,
    kind: str = "forward_backward",
    variant: int = 0,
    owner: str = "alice",
    idempotency_key: str | None = None,
) -> tuple[str, bool]:
    return submit_payload(factory, model_id, seq_id, payload(kind, variant), owner, idempotency_key)


def submit_payload(
    factory: Factory,
    model_id: str | None,
    seq_id: int | None,
    job: JobPayload,
    owner: str = "alice",
    idempotency_key: str | None = None,
) -> tuple[str, bool]:
    with factory.begin() as session:
        job, created = submit_job(
            session,
            owner=owner,
            base_model=BASE,
            model_id=model_id,
            seq_id=seq_id,
            payload=job,
            idempotency_key=idempotency_key,
        )
        return job.id, created


def claim(
    factory: Factory, *, limit: int = 16, worker_id: str = "w1", retries: RetryPolicy = "mixed"
) -> list[ClaimedJob]:
    with factory.begin() as session:
        return claim_ready_jobs(
            session,
            base_models=[BASE],
            worker_id=worker_id,
            lease_seconds=LEASE_SECONDS,
            limit=limit,
            retries=retries,
        )


def complete(factory: Factory, job: ClaimedJob) -> bool:
    with factory.begin() as session:
        return complete_job(session, job.id, job.fencing_token, {"ok": job.id})


def expire_leases(factory: Factory, *, max_attempts: int = 3) -> int:
    with factory.begin() as session:
        later = utcnow() + timedelta(seconds=LEASE_SECONDS + 1)
        return release_expired_leases(session, later, max_attempts=max_attempts)


def next_seq_id(factory: Factory, run_id: str) -> int:
    with factory() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        return run.next_seq_id


def load(factory: Factory, job_id: str) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def load_claimed(factory: Factory, job_id: str) -> ClaimedJob:
    with factory() as session:
        return claimed(session.get(Job, job_id))


def seqs(claimed: list[ClaimedJob]) -> list[int | None]:
    return [job.seq_id for job in claimed]


# --- ordering -------------------------------------------------------------


def test_chain_is_claimed_whole_and_in_seq_order(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    for seq in (3, 1, 2):
        submit(session_factory, run, seq)

    claimed = claim(session_factory)

    assert seqs(claimed) == [1, 2, 3]
    assert [job.id for job in claimed] == [f"{run}:1", f"{run}:2", f"{run}:3"]
    assert all(job.fencing_token == 1 for job in claimed)
    assert claim(session_factory) == []  # nothing queued is ready while the chain is leased


def test_gap_blocks_later_seqs(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    submit(session_factory, run, 3)

    (first,) = claim(session_factory)
    assert first.seq_id == 1
    assert complete(session_factory, first)
    assert claim(session_factory) == []  # seq 3 waits for seq 2

    submit(session_factory, run, 2)
    assert seqs(claim(session_factory)) == [2, 3]


def test_completing_a_seq_makes_the_next_ready(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    (first,) = claim(session_factory)
    submit(session_factory, run, 2)
    assert claim(session_factory) == []  # seq 1 is still running

    assert complete(session_factory, first)
    assert next_seq_id(session_factory, run) == 2
    assert seqs(claim(session_factory)) == [2]


def test_limit_cuts_a_chain_short_and_the_rest_waits(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    for seq in range(1, 5):
        submit(session_factory, run, seq)

    first_two = claim(session_factory, limit=2)
    assert seqs(first_two) == [1, 2]
    assert claim(session_factory) == []
    for job in first_two:
        assert complete(session_factory, job)
    assert seqs(claim(session_factory)) == [3, 4]


def test_unordered_jobs_are_ready_at_once_and_ordered_by_submission(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    run = make_run()
    unloaded_run = f"{run}-not-created-yet"
    submit(session_factory, run, 2)  # waits for seq 1
    submit(session_factory, unloaded_run, 1)  # waits for its run row
    sample_id, _ = submit(session_factory, "sampler-1", 7, kind="sample")
    create_id, _ = submit(session_factory, "s:sample:1", None, kind="sample")
    fb_id, _ = submit(session_factory, run, 1)

    claimed = claim(session_factory)

    assert [job.id for job in claimed] == [sample_id, create_id, fb_id, f"{run}:2"]


def test_claim_only_takes_the_workers_base_models(session_factory: Factory) -> None:
    with session_factory.begin() as session:
        submit_job(session, owner="alice", base_model="other", model_id="s", seq_id=1, payload=payload("sample"))
    assert claim(session_factory) == []


# --- replay and conflicts --------------------------------------------------


def test_duplicate_seq_returns_the_existing_job(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    job_id, created = submit(session_factory, run, 1)
    replay_id, replay_created = submit(session_factory, run, 1)

    assert (created, replay_created) == (True, False)
    assert replay_id == job_id
    assert len(claim(session_factory)) == 1


def test_idempotency_key_replay_returns_the_existing_job(session_factory: Factory) -> None:
    first_id, created = submit(session_factory, None, None, kind="sample", idempotency_key="k1")
    replay_id, replay_created = submit(session_factory, None, None, kind="sample", idempotency_key="k1")
    other_tenant_id, other_created = submit(
        session_factory, None, None, kind="sample", idempotency_key="k1", owner="bob"
    )

    assert (created, replay_created, other_created) == (True, False, True)
    assert replay_id == first_id != other_tenant_id


def test_reusing_a_seq_or_key_for_a_different_request_conflicts(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    run = make_run()
    job_id, _ = submit(session_factory, run, 1, kind="optim_step")
    submit(session_factory, None, None, kind="sample", idempotency_key="k1")

    with pytest.raises(JobConflict) as by_seq:
        submit(session_factory, run, 1, kind="optim_step", variant=1)
    with pytest.raises(JobConflict, match="kind"):
        submit(session_factory, run, 1, kind="forward_backward")
    with pytest.raises(JobConflict, match="payload"):
        submit(session_factory, None, None, kind="sample", idempotency_key="k1", variant=1)

    assert by_seq.value.existing_job_id == job_id
    assert len(claim(session_factory)) == 2  # nothing was applied twice


def test_sample_seq_ids_live_in_their_own_lane(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    _, train_created = submit(session_factory, run, 1)
    _, sample_created = submit(session_factory, run, 1, kind="sample")
    assert train_created and sample_created


def test_training_op_without_its_run_or_place_is_rejected(session_factory: Factory) -> None:
    with pytest.raises(ValueError, match="model_id"):
        submit(session_factory, None, 1, kind="optim_step")
    with pytest.raises(ValueError, match="seq_id"):
        submit(session_factory, "run", None, kind="unload_model")


def test_claimed_payloads_are_typed_and_an_unreadable_one_fails_alone(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    run = make_run()
    step_id, _ = submit(session_factory, run, 1, kind="optim_step", variant=2)
    bad_id, _ = submit(session_factory, run, 2, kind="optim_step")
    with session_factory.begin() as session:  # as a newer API might have written it
        session.get_one(Job, bad_id).payload = {"adam": {}, "momentum_schedule": "cosine"}

    step, bad = claim(session_factory)

    assert (step.id, bad.id) == (step_id, bad_id)
    assert isinstance(step.payload, OptimStepJob) and step.payload.adam.learning_rate == pytest.approx(3e-4)
    assert isinstance(bad.payload, UnreadablePayload) and "momentum_schedule" in bad.payload.error


# --- fencing and leases ----------------------------------------------------


def test_stale_fencing_token_cannot_write(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    (stale,) = claim(session_factory, worker_id="lost-worker")
    assert expire_leases(session_factory) == 1
    (fresh,) = claim(session_factory, worker_id="w2")
    assert fresh.fencing_token == stale.fencing_token + 1

    with session_factory.begin() as session:
        assert not complete_job(session, stale.id, stale.fencing_token, {"stale": True})
        assert not fail_job(session, stale.id, stale.fencing_token, "late", "server")
    assert load(session_factory, fresh.id).state == "leased"
    assert next_seq_id(session_factory, run) == 1

    assert complete(session_factory, fresh)
    assert not complete(session_factory, fresh)  # a finished job stays finished
    job = load(session_factory, fresh.id)
    assert (job.state, job.result, job.attempt) == ("done", {"ok": fresh.id}, 2)
    assert job.finished_at is not None and job.finished_at.tzinfo is not None


def test_lease_expiry_requeues_then_fails_after_max_attempts(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    submit(session_factory, run, 2)

    with session_factory.begin() as session:  # leases still live: nothing to release
        assert release_expired_leases(session, utcnow()) == 0
    for attempt in (1, 2):
        claimed = claim(session_factory, limit=1)
        assert seqs(claimed) == [1]
        assert expire_leases(session_factory) == 1
        job = load(session_factory, claimed[0].id)
        assert (job.state, job.attempt, job.lease_owner) == ("queued", attempt, None)

    claim(session_factory, limit=1)
    assert expire_leases(session_factory) == 1

    job = load(session_factory, f"{run}:1")
    assert (job.state, job.error_category) == ("failed", "server")
    assert "lost 3 times" in job.error and "not retried again" in job.error
    assert next_seq_id(session_factory, run) == 2
    assert seqs(claim(session_factory)) == [2]


def test_a_job_whose_worker_died_is_retried_alone_on_an_idle_worker(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    alice, bob = make_run(), make_run(owner="bob")
    submit(session_factory, alice, 1)
    submit(session_factory, alice, 2)
    sample, _ = submit(session_factory, None, None, kind="sample", owner="bob")
    assert len(claim(session_factory, limit=2)) == 2  # alice:1 and alice:2 share a tick whose worker dies
    assert expire_leases(session_factory) == 2
    submit(session_factory, bob, 1, owner="bob")

    assert claim(session_factory, retries="drain") == []  # a worker still decoding takes nothing new
    assert seqs(claim(session_factory, retries="alone")) == [1]  # the oldest retried job, by itself
    assert expire_leases(session_factory) == 1  # it took its worker down again: only it paid for that
    assert seqs(claim(session_factory, retries="alone")) == [1]
    assert complete(session_factory, load_claimed(session_factory, f"{alice}:1"))
    assert seqs(claim(session_factory, retries="alone")) == [2]  # the other job of the dead tick, alone too
    assert complete(session_factory, load_claimed(session_factory, f"{alice}:2"))
    assert {job.id for job in claim(session_factory, retries="alone")} == {sample, f"{bob}:1"}


def test_a_chain_is_cut_before_a_retried_job(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    for seq in (1, 2, 3):
        submit(session_factory, run, seq)
    with session_factory.begin() as session:
        session.get(Job, f"{run}:2").attempt = 1  # leased once by a worker that died, then requeued
    assert seqs(claim(session_factory, retries="drain")) == [1]


def test_user_error_failure_advances_the_run(session_factory: Factory, make_run: Callable[..., str]) -> None:
    run = make_run()
    submit(session_factory, run, 1)
    submit(session_factory, run, 2)
    bad, good = claim(session_factory)

    with session_factory.begin() as session:
        assert fail_job(session, bad.id, bad.fencing_token, "loss_fn 'nope' is unknown", "user")
    assert next_seq_id(session_factory, run) == 2
    assert complete(session_factory, good)
    assert next_seq_id(session_factory, run) == 3

    failed = load(session_factory, bad.id)
    assert (failed.state, failed.error_category, failed.error) == (
        "failed",
        "user",
        "loss_fn 'nope' is unknown",
    )


def test_fail_job_rejects_an_unknown_category(session_factory: Factory) -> None:
    submit(session_factory, "sampler", 1, kind="sample")
    (job,) = claim(session_factory)
    with session_factory.begin() as session, pytest.raises(ValueError):
        fail_job(session, job.id, job.fencing_token, "boom", "cosmic-rays")


# --- reads -----------------------------------------------------------------


def test_get_job_is_tenant_scoped(session_factory: Factory) -> None:
    job_id, _ = submit(session_factory, "sampler", 1, kind="sample", owner="alice")
    with session_factory() as session:
        job = get_job(session, job_id, "alice")
        assert job is not None and job.created_at.tzinfo is not None
        assert get_job(session, job_id, "bob") is None
        assert get_job(session, "no-such-job", "alice") is None


def test_queue_position_counts_queued_jobs_ahead_on_the_same_base_model(session_factory: Factory) -> None:
    ids = [submit(session_factory, "sampler", seq, kind="sample")[0] for seq in range(3)]
    with session_factory.begin() as session:
        submit_job(session, owner="bob", base_model="other", model_id="s", seq_id=0, payload=payload("sample"))

    def positions() -> list[int]:
        with session_factory() as session:
            return [queue_position(session, session.get_one(Job, job_id)) for job_id in ids]

    assert positions() == [0, 1, 2]
    claim(session_factory, limit=1)
    assert positions() == [0, 0, 1]


def test_a_tick_packs_forward_passes_up_to_its_token_budget(
    session_factory: Factory, make_run: Callable[..., str]
) -> None:
    big, small = make_run(), make_run(owner="bob")
    for seq in (1, 2):
        submit_payload(session_factory, big, seq, ForwardBackwardJob(input=fb_input(list(range(1, 42)))))  # 40 tokens
    submit_payload(session_factory, small, 1, ForwardBackwardJob(input=fb_input([1, 2, 3, 4, 5])), owner="bob")
    with session_factory() as session:
        assert session.get(Job, f"{big}:1").cost_tokens == 40 and session.get(Job, f"{small}:1").cost_tokens == 4

    def claim_within(budget: int) -> list[str]:
        with session_factory.begin() as session:
            jobs = claim_ready_jobs(
                session, base_models=[BASE], worker_id="w1", lease_seconds=LEASE_SECONDS, limit=16, token_budget=budget
            )
        return [job.id for job in jobs]

    # big:2 would overflow the tick, so big's chain stops at 1; bob's later, small request still fills the tick
    assert claim_within(50) == [f"{big}:1", f"{small}:1"]
    for job_id in (f"{big}:1", f"{small}:1"):
        assert complete(session_factory, load_claimed(session_factory, job_id))
    assert claim_within(10) == [f"{big}:2"]  # the first job is always taken, whatever its cost
