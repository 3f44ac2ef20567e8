"""A checkpoint's files and its row commit together or not at all, and one outcome never sinks a tick.

Tiny Kimi K2 behind a real consumer and SQLite job store:
- a `save_weights` whose files were written when its worker died is replayed elsewhere: it ends listed, loadable
  and done (it used to fail with "already exists", leaving the files orphaned and nothing listed); the dead
  attempt's files are what `gc` removes, and only those;
- an outcome the database cannot take (a TTL that overflows the timestamp) fails that job alone as a server error
  in the same tick, another tenant's forward_backward completes, and the save's files are deleted;
- two saves racing for one name: the first is listed, the second fails as a user error and leaves no files; an
  overwrite replaces the row and deletes the replaced files;
- path-like checkpoint ids (`.`, `..`) never name a folder.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from api.db.jobs import claim_ready_jobs, release_expired_leases
from api.db.models import Checkpoint, Job, JobState, TrainingRun
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import CheckpointTarget, SaveWeightsJob
from tests.unit.test_worker_engine import ADAM, SEQ_A, ce_payload
from tests.unit.test_worker_recovery import BASE, drain, make_consumer, ops, submit
from tests.unit.worker_fixtures import fresh_model
from worker.engine import Engine


@pytest.fixture(scope="module")
def models():
    return {name: fresh_model("tiny_kimi_k2") for name in ("first", "second")}


def new_run(session_factory, make_run, owner: str = "alice") -> str:
    run = make_run(owner=owner, base_model=BASE)
    with session_factory.begin() as session:
        session.get(TrainingRun, run).next_seq_id = 0
    return run


def save(run: str, name: str, *, ttl_seconds: int | None = None, overwrite: bool = False) -> SaveWeightsJob:
    checkpoint_id = f"weights/{name}"
    target = CheckpointTarget(
        checkpoint_id=checkpoint_id,
        tinker_path=f"tinker://{run}/{checkpoint_id}",
        ttl_seconds=ttl_seconds,
        overwrite=overwrite,
    )
    return SaveWeightsJob(target=target)


def job_row(factory, job_id: str) -> Job:
    with factory() as session:
        row = session.get(Job, job_id)
        session.expunge(row)
        return row


def checkpoint_rows(factory, run: str) -> list[Checkpoint]:
    with factory() as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run)).all()
        session.expunge_all()
        return list(rows)


def folder(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_a_save_whose_files_landed_before_its_worker_died_is_listed_after_replay(
    session_factory, make_run, models, tmp_path
) -> None:
    run = new_run(session_factory, make_run)
    store = LocalCheckpointStore(tmp_path / "shared")
    for seq in range(3):  # create, forward_backward, optim_step
        submit(session_factory, run, seq, ops(run)[seq])
    first = make_consumer(Engine(models["first"], store), session_factory, "w1")
    drain(first)
    submit(session_factory, run, 3, save(run, "mid"))
    with session_factory.begin() as session:  # w1 leases the save, writes its files, and dies before recording
        claimed = claim_ready_jobs(session, base_models=[BASE], worker_id="w1", lease_seconds=60, limit=8)
    (outcome,) = first.engine.execute(claimed)
    assert outcome.error is None and outcome.checkpoint is not None
    orphans = sorted(p.parent for p in (tmp_path / "shared").rglob("manifest.json"))
    assert len(orphans) == 1, orphans

    with session_factory.begin() as session:
        assert release_expired_leases(session, utcnow() + timedelta(seconds=120)) == 1
    drain(make_consumer(Engine(models["second"], store), session_factory, "w2"))

    assert job_row(session_factory, f"{run}:3").state == JobState.DONE.value, job_row(session_factory, f"{run}:3").error
    (row,) = checkpoint_rows(session_factory, run)
    assert row.checkpoint_id == "weights/mid" and row.committed
    store.open(row.storage_uri)  # verified: every file matches its manifest
    assert folder(row.storage_uri) != orphans[0]
    report = store.gc([row.storage_uri], older_than=timedelta(0), now=None)
    assert report.deleted == [str(orphans[0])]
    store.open(row.storage_uri)


def test_an_outcome_the_database_cannot_take_fails_that_job_alone(session_factory, make_run, models, tmp_path) -> None:
    alice, bob = new_run(session_factory, make_run, "alice"), new_run(session_factory, make_run, "bob")
    store = LocalCheckpointStore(tmp_path / "shared")
    consumer = make_consumer(Engine(models["first"], store), session_factory, "w1")
    consumer.lease_seconds = 5  # before the fix, recording retried until the lease ran out, then dropped the tick
    for owner, run in (("alice", alice), ("bob", bob)):
        submit(session_factory, run, 0, ops(run)[0], owner=owner)
    drain(consumer)
    submit(session_factory, alice, 1, save(alice, "forever", ttl_seconds=10**18))
    submit(session_factory, bob, 1, ce_payload(SEQ_A), owner="bob")
    assert consumer.tick() == 2  # one tick holds both

    failed, done = job_row(session_factory, f"{alice}:1"), job_row(session_factory, f"{bob}:1")
    assert failed.state == JobState.FAILED.value and failed.error_category == "server"
    assert "could not be recorded" in failed.error and "OverflowError" in failed.error
    assert done.state == JobState.DONE.value and done.result["metrics"]["loss:sum"] > 0
    assert checkpoint_rows(session_factory, alice) == []
    assert list((tmp_path / "shared").rglob("manifest.json")) == []  # the unrecorded save left no files


def test_two_saves_racing_for_one_name_keep_the_first(session_factory, make_run, models, tmp_path) -> None:
    run = new_run(session_factory, make_run)
    store = LocalCheckpointStore(tmp_path / "shared")
    submit(session_factory, run, 0, ops(run)[0])
    submit(session_factory, run, 1, save(run, "x"))
    submit(session_factory, run, 2, save(run, "x"))  # both passed the API's name check before either ran
    drain(make_consumer(Engine(models["first"], store), session_factory, "w1"))

    assert job_row(session_factory, f"{run}:1").state == JobState.DONE.value
    second = job_row(session_factory, f"{run}:2")
    assert second.state == JobState.FAILED.value and second.error_category == "user"
    assert "already exists" in second.error
    (first,) = checkpoint_rows(session_factory, run)
    assert [p.parent for p in (tmp_path / "shared").rglob("manifest.json")] == [folder(first.storage_uri)]

    submit(session_factory, run, 3, ADAM)
    submit(session_factory, run, 4, save(run, "x", overwrite=True))
    drain(make_consumer(Engine(models["first"], store), session_factory, "w1"))
    (replaced,) = checkpoint_rows(session_factory, run)
    assert replaced.storage_uri != first.storage_uri
    assert [p.parent for p in (tmp_path / "shared").rglob("manifest.json")] == [folder(replaced.storage_uri)]
    store.open(replaced.storage_uri)


@pytest.mark.parametrize("checkpoint_id", ["weights/.", "weights/..", "..", "weights//x", "/etc"])
def test_path_like_checkpoint_ids_never_name_a_folder(tmp_path, checkpoint_id: str) -> None:
    store = LocalCheckpointStore(tmp_path / "root")
    kept = tmp_path / "root" / "alice" / "run_1" / "keep.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("still here")
    with pytest.raises(ValueError, match="cannot name a folder"):
        store.write("alice", "run:1", checkpoint_id, lambda folder: (folder / "a").write_text("x"))
    assert kept.read_text() == "still here"
