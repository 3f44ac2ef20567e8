"""A request that kills its worker every time it runs is failed after `max_attempts`, and takes nobody with it.

A real consumer and tiny Kimi K2 engine over SQLite; the engine "dies" (raises a BaseException the consumer does
not catch, leaving every lease of the tick unrecorded, as a SIGKILL or the OOM killer would) whenever its tick
holds the poison request. Each death is followed by what a restart does: the dead worker's leases are requeued
(`release_expired_leases`, the attempt count kept in the database). The poison request of tenant A ends failed
with a clear error after exactly `max_attempts` deaths, while tenant B's request, which shared the first fatal
tick, completes: retried jobs run in a tick of their own. Before that rule, B shared every fatal tick and was
failed as a poison request too.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from api.db.jobs import release_expired_leases
from api.db.models import JobState
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore
from tests.unit.test_worker_checkpoint_commit import job_row, new_run
from tests.unit.test_worker_engine import SEQ_A, ce_payload
from tests.unit.test_worker_recovery import drain, ops, submit
from tests.unit.worker_fixtures import fresh_model
from worker.consumer import Consumer
from worker.engine import Engine

MAX_ATTEMPTS = 3


class WorkerDied(BaseException):
    """Stands for the process being killed mid-tick: nothing after it runs, nothing is recorded."""


class DiesOnPoison(Engine):
    def __init__(self, *args, poison: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison, self.deaths = poison, 0

    def execute(self, jobs):
        if any(job.id == self.poison for job in jobs):
            self.deaths += 1
            raise WorkerDied
        return super().execute(jobs)


def restarted(engine: Engine, session_factory) -> Consumer:
    return Consumer(engine, session_factory, "w1", lease_seconds=60, max_attempts=MAX_ATTEMPTS)


@pytest.fixture(scope="module")
def model():
    return fresh_model("tiny_kimi_k2")


def test_a_poison_request_is_failed_after_max_attempts_without_taking_another_tenant_down(
    session_factory, make_run, model, tmp_path
) -> None:
    alice, bob = new_run(session_factory, make_run, "alice"), new_run(session_factory, make_run, "bob")
    for owner, run in (("alice", alice), ("bob", bob)):
        submit(session_factory, run, 0, ops(run)[0], owner=owner)
    engine = DiesOnPoison(model, LocalCheckpointStore(tmp_path / "store"), poison=f"{alice}:1")
    drain(restarted(engine, session_factory))
    submit(session_factory, alice, 1, ce_payload(SEQ_A))
    submit(session_factory, bob, 1, ce_payload(SEQ_A), owner="bob")

    for _ in range(10):  # restart after each death, until every request is final
        try:
            drain(restarted(engine, session_factory))
            break
        except WorkerDied:
            with session_factory.begin() as session:  # what the restarted server does first
                release_expired_leases(session, utcnow() + timedelta(days=1), max_attempts=MAX_ATTEMPTS)

    poison, other = job_row(session_factory, f"{alice}:1"), job_row(session_factory, f"{bob}:1")
    assert engine.deaths == MAX_ATTEMPTS
    assert (poison.state, poison.error_category, poison.attempt) == (JobState.FAILED.value, "server", MAX_ATTEMPTS)
    assert f"lost {MAX_ATTEMPTS} times" in poison.error
    assert other.state == JobState.DONE.value and other.attempt == 2, other.error
