"""api/db on a real PostgreSQL: concurrent job claims and submissions (migrations: test_migrations_roundtrip.py).

The concurrency tests also run on a SQLite file as a control, since the embedded
server shares one SQLite database between API and worker threads.
"""

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import claim_ready_jobs, complete_job, submit_job
from api.db.models import ClientSession, Job, TrainingRun
from api.db.session import make_engine, make_session_factory, upgrade_to_head
from tests.job_payloads import payload

pytestmark = pytest.mark.integration

BASE = "tiny-kimi-k2"
Factory = sessionmaker[Session]
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
def session_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'loom.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def create_runs(factory: Factory, count: int) -> list[str]:
    with factory.begin() as session:
        client_session = ClientSession(owner="alice")
        session.add(client_session)
        session.flush()
        runs = [
            TrainingRun(
                id=f"{client_session.id}:train:{index}",
                owner="alice",
                session_id=client_session.id,
                model_seq_id=index,
                base_model=BASE,
                lora_rank=4,
                train_attn=True,
                train_mlp=True,
                train_unembed=False,
            )
            for index in range(count)
        ]
        session.add_all(runs)
        return [run.id for run in runs]


def run_concurrently(threads: int, task: Callable[[int], T]) -> list[T]:
    """Run ``task(i)`` on ``threads`` threads released together; re-raises their errors."""
    start = threading.Barrier(threads)

    def released(index: int) -> T:
        start.wait()
        return task(index)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(released, range(threads)))


def test_concurrent_claimers_never_lease_the_same_job(session_factory: Factory) -> None:
    runs, seqs_per_run, unordered = create_runs(session_factory, 8), 6, 48
    with session_factory.begin() as session:
        for run in runs:
            for seq in range(seqs_per_run, 0, -1):  # submitted out of order on purpose
                submit_job(
                    session,
                    owner="alice",
                    base_model=BASE,
                    model_id=run,
                    seq_id=seq,
                    payload=payload("forward_backward"),
                )
        for index in range(unordered):
            submit_job(
                session,
                owner="alice",
                base_model=BASE,
                model_id="sampler",
                seq_id=index,
                payload=payload("sample"),
            )
    total = len(runs) * seqs_per_run + unordered
    deadline = time.monotonic() + 15

    def work(worker: int) -> list[str]:
        leased: list[str] = []
        while time.monotonic() < deadline:
            with session_factory.begin() as session:
                claimed = claim_ready_jobs(
                    session, base_models=[BASE], worker_id=f"w{worker}", lease_seconds=60, limit=4
                )
            if not claimed:
                with session_factory() as session:
                    unfinished = session.scalar(select(func.count()).select_from(Job).where(Job.state != "done"))
                if not unfinished:
                    return leased
                time.sleep(0.001)  # the rest is leased by another worker
                continue
            leased += [job.id for job in claimed]
            for job in claimed:
                with session_factory.begin() as session:
                    assert complete_job(session, job.id, job.fencing_token, {"by": worker})
        raise TimeoutError("queue not drained")

    leased = [job_id for ids in run_concurrently(4, work) for job_id in ids]

    assert len(leased) == len(set(leased)) == total
    with session_factory() as session:
        jobs = session.scalars(select(Job)).all()
        assert {(job.state, job.attempt, job.fencing_token) for job in jobs} == {("done", 1, 1)}
        for run in runs:
            run_jobs = sorted((job for job in jobs if job.model_id == run), key=lambda job: job.seq_id or 0)
            finished = [job.finished_at.timestamp() for job in run_jobs if job.finished_at is not None]
            assert len(finished) == seqs_per_run and finished == sorted(finished), f"{run} ran out of order"
            assert session.get_one(TrainingRun, run).next_seq_id == seqs_per_run + 1


def test_concurrent_duplicate_submissions_apply_once(session_factory: Factory) -> None:
    (run,) = create_runs(session_factory, 1)
    seqs = range(1, 21)

    def submit_all(_: int) -> list[bool]:
        created = []
        for seq in seqs:
            with session_factory.begin() as session:
                job, was_created = submit_job(
                    session,
                    owner="alice",
                    base_model=BASE,
                    model_id=run,
                    seq_id=seq,
                    payload=payload("optim_step"),
                )
                assert job.id == f"{run}:{seq}"
            created.append(was_created)
        return created

    per_thread = run_concurrently(8, submit_all)

    assert [sum(created) for created in zip(*per_thread, strict=True)] == [1] * len(seqs)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == len(seqs)
