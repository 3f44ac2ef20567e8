"""A run's state is rebuilt from the database's op log when it is absent or stale on a worker (run_recovery).

Tiny Kimi K2, one run: create (the seed the API derives from the run id) → fb → step → save_weights → fb → step, then
more ops. Checked against one engine executing every op once, in order:
- a fresh consumer (the run moved after its worker died) restores from the committed save_weights checkpoint
  plus a replay of the two later ops, then runs the new ops; final LoRA factors equal (atol 1e-6);
- a worker whose ops were applied but never recorded (lease lost, requeued, claimed again) notices the stale
  state, rebuilds it from the log and applies each op exactly once (same final factors);
- the plan names the newest committed training checkpoint and only the state-changing ops after it;
- with recovery checkpoints every optimizer step, the plan starts from the newest one, which is the only one
  kept (row and files), and a run continued from it still ends with the same factors; a recovery checkpoint
  that cannot be written never fails its optim_step;
- a starting checkpoint that fails verification (a flipped byte) is skipped: the rebuild falls back to the older
  save_weights checkpoint, then to the whole log, and the final factors are still the same;
- an unloaded run is not restored.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from sqlalchemy import select

from api.db.jobs import claim_ready_jobs, release_expired_leases, submit_job
from api.db.models import Checkpoint, TrainingRun
from api.db.types import utcnow
from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import (
    CheckpointTarget,
    CreateModelJob,
    ForwardJob,
    JobKind,
    JobPayload,
    RunLora,
    SaveWeightsJob,
    UnloadModelJob,
    default_lora_seed,
    result_json,
)
from tests.unit.test_worker_engine import ADAM, SEQ_A, ce_payload, job
from tests.unit.worker_fixtures import fresh_model, run_to_completion
from worker.consumer import Consumer
from worker.engine import Engine
from worker.run_recovery import RunNotRestorable, restore_plan

BASE = "loom/tiny-kimi-k2"
ATOL = 1e-6


def save_payload(run: str, name: str) -> SaveWeightsJob:
    return SaveWeightsJob(
        target=CheckpointTarget(checkpoint_id=f"weights/{name}", tinker_path=f"tinker://{run}/weights/{name}")
    )


def ops(run: str) -> list[JobPayload]:
    """seq 0..9: create, fb, step, save, fb, step, fb (forward only), fb, step, save."""
    lora = RunLora(rank=4, seed=default_lora_seed(run), train_attn=True, train_mlp=True, train_unembed=True)
    return [
        CreateModelJob(lora=lora),
        ce_payload(SEQ_A),
        ADAM,
        save_payload(run, "mid"),
        ce_payload(SEQ_A[:1]),
        ADAM,
        ForwardJob(input=ce_payload(SEQ_A).input),
        ce_payload(SEQ_A[1:]),
        ADAM,
        save_payload(run, "end"),
    ]


@pytest.fixture(scope="module")
def models():
    return {name: fresh_model("tiny_kimi_k2") for name in ("reference", "first", "second")}


@pytest.fixture
def run_id(session_factory, make_run) -> str:
    run = make_run(base_model=BASE)
    with session_factory.begin() as session:
        session.get(TrainingRun, run).next_seq_id = 0
    return run


def reference_factors(lm, run: str, store_root) -> dict[str, torch.Tensor]:
    engine = Engine(lm, LocalCheckpointStore(store_root))
    jobs = [job("alice", run, seq, payload) for seq, payload in enumerate(ops(run))]
    assert all(o.error is None for o in run_to_completion(engine, jobs))
    return factors(engine, run)


def factors(engine: Engine, run: str) -> dict[str, torch.Tensor]:
    adapter = engine.pool.run(run).adapter
    return {f"{name}.{i}": t.detach().clone() for name, pair in adapter.params.items() for i, t in enumerate(pair)}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    moved = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=name)
        moved += int(not torch.equal(want[name], torch.zeros_like(want[name])))
    assert moved > 0


def submit(factory, run: str, seq: int, payload: JobPayload, owner: str = "alice") -> None:
    with factory.begin() as session:
        submit_job(session, owner=owner, base_model=BASE, model_id=run, seq_id=seq, payload=payload)


def submit_ops(factory, run: str, seqs: range) -> None:
    for seq in seqs:
        submit(factory, run, seq, ops(run)[seq])


def make_consumer(engine: Engine, factory, worker_id: str) -> Consumer:
    return Consumer(engine, factory, worker_id, lease_seconds=600)


def drain(consumer: Consumer) -> None:
    while consumer.tick():
        pass


def test_a_run_moved_to_a_fresh_worker_continues_from_checkpoint_plus_replay(
    session_factory, run_id, models, tmp_path
) -> None:
    want = reference_factors(models["reference"], run_id, tmp_path / "ref")
    store = LocalCheckpointStore(tmp_path / "shared")
    first = make_consumer(Engine(models["first"], store), session_factory, "w1")
    submit_ops(session_factory, run_id, range(0, 6))
    drain(first)
    with session_factory() as session:
        plan = restore_plan(session, run_id, 6)
    assert plan.checkpoint_uri is not None and "/weights/mid~" in plan.checkpoint_uri
    assert [(j.seq_id, j.kind) for j in plan.ops] == [(4, JobKind.FORWARD_BACKWARD), (5, JobKind.OPTIM_STEP)]
    assert plan.last_seq == 5

    second = make_consumer(Engine(models["second"], store), session_factory, "w2")  # the first worker "died"
    submit_ops(session_factory, run_id, range(6, 10))
    drain(second)
    assert_same(factors(second.engine, run_id), want)


def test_ops_applied_but_not_recorded_are_not_applied_twice(session_factory, run_id, models, tmp_path) -> None:
    want = reference_factors(models["reference"], run_id, tmp_path / "ref")
    worker = make_consumer(Engine(models["first"], LocalCheckpointStore(tmp_path / "store")), session_factory, "w1")
    submit_ops(session_factory, run_id, range(0, 3))
    drain(worker)
    submit_ops(session_factory, run_id, range(3, 10))
    with session_factory.begin() as session:  # claim and execute, then lose the lease before recording
        lost = claim_ready_jobs(session, base_models=[BASE], worker_id="w1", lease_seconds=60, limit=4)
    assert [j.seq_id for j in lost] == [3, 4, 5, 6]
    worker.engine.execute(lost)
    with session_factory.begin() as session:
        assert release_expired_leases(session, utcnow() + timedelta(seconds=61)) == 4
    assert worker.engine.needs_restore(lost[0])
    drain(worker)
    assert_same(factors(worker.engine, run_id), want)


def first_eight_ops_with_recovery_every_step(session_factory, run_id, lm, tmp_path) -> LocalCheckpointStore:
    """Ops 0-7 on a worker writing a recovery checkpoint after each optim_step (seq 2, then 5); its store."""
    store = LocalCheckpointStore(tmp_path / "shared")
    drain_ops(
        make_consumer(Engine(lm, store, recovery_every=1), session_factory, "w1"), session_factory, run_id, range(0, 8)
    )
    return store


def drain_ops(consumer: Consumer, factory, run: str, seqs: range) -> None:
    submit_ops(factory, run, seqs)
    drain(consumer)


def test_a_run_rebuilt_from_its_newest_recovery_checkpoint(session_factory, run_id, models, tmp_path) -> None:
    want = reference_factors(models["reference"], run_id, tmp_path / "ref")
    store = first_eight_ops_with_recovery_every_step(session_factory, run_id, models["first"], tmp_path)
    with session_factory() as session:
        plan = restore_plan(session, run_id, 8)
        kept = session.scalars(select(Checkpoint).where(Checkpoint.checkpoint_id.startswith("recovery/"))).all()
    assert plan.checkpoint_uri is not None and "/recovery/5~" in plan.checkpoint_uri
    assert [(j.seq_id, j.kind) for j in plan.ops] == [(7, JobKind.FORWARD_BACKWARD)]  # 6 is forward-only
    assert [(c.checkpoint_id, c.ephemeral, c.committed) for c in kept] == [("recovery/5", True, True)]
    assert [p.name for p in store.open(plan.checkpoint_uri).parent.iterdir()] == ["5~5.1"]  # the older ones are gone

    second = make_consumer(Engine(models["second"], store), session_factory, "w2")
    drain_ops(second, session_factory, run_id, range(8, 10))
    assert_same(factors(second.engine, run_id), want)


def flip_a_byte(folder) -> None:
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_a_corrupt_starting_checkpoint_falls_back_to_an_older_one(
    session_factory, run_id, models, tmp_path, caplog
) -> None:
    want = reference_factors(models["reference"], run_id, tmp_path / "ref")
    store = first_eight_ops_with_recovery_every_step(session_factory, run_id, models["first"], tmp_path)
    with session_factory() as session:
        newest = restore_plan(session, run_id, 8)
        older = restore_plan(session, run_id, 8, frozenset({newest.checkpoint_uri}))
        log_only = restore_plan(session, run_id, 8, frozenset({newest.checkpoint_uri, older.checkpoint_uri}))
    assert "/recovery/5~" in newest.checkpoint_uri and "/weights/mid~" in older.checkpoint_uri
    assert log_only.checkpoint_uri is None and log_only.ops[0].kind == "create_model"
    for plan in (newest, older):
        flip_a_byte(store.open(plan.checkpoint_uri))

    second = make_consumer(Engine(models["second"], store), session_factory, "w2")
    with caplog.at_level("INFO", logger="worker.consumer"):
        drain_ops(second, session_factory, run_id, range(8, 10))
    assert len([r for r in caplog.records if "skipping" in r.message]) == 2
    assert_same(factors(second.engine, run_id), want)


class RecoveryWritesFail(LocalCheckpointStore):
    def write(self, owner, run_id, checkpoint_id, fill, overwrite=False):
        if checkpoint_id.startswith("recovery/"):
            raise OSError("disk full")
        return super().write(owner, run_id, checkpoint_id, fill, overwrite)


def test_a_failed_recovery_checkpoint_does_not_fail_the_step(run_id, models, tmp_path) -> None:
    engine = Engine(models["first"], RecoveryWritesFail(tmp_path / "store"), recovery_every=1)
    outcomes = run_to_completion(engine, [job("alice", run_id, seq, p) for seq, p in enumerate(ops(run_id)[:3])])
    assert [o.error for o in outcomes] == [None, None, None]
    assert "metrics" in result_json(outcomes[2].result) and outcomes[2].checkpoint is None


def test_an_unloaded_run_is_not_restored(session_factory, run_id, models, tmp_path) -> None:
    worker = make_consumer(Engine(models["first"], LocalCheckpointStore(tmp_path / "store")), session_factory, "w1")
    submit_ops(session_factory, run_id, range(0, 2))
    submit(session_factory, run_id, 2, UnloadModelJob())
    drain(worker)
    with session_factory() as session, pytest.raises(RunNotRestorable, match="unloaded"):
        restore_plan(session, run_id, 3)
