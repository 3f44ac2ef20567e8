"""worker.engine.Engine.execute over ClaimedJob objects carrying the typed payloads the API stores.

Two tenants' training runs (tiny Kimi K2: MLA attention, dense MLP, shared + routed experts) are executed in
one interleaved, shuffled tick: create_model → forward_backward → optim_step → forward_backward → save. Checked:
- one outcome per job, each a success with the right result shape; each run's loss goes down after its step;
- run A's results from the mixed tick equal executing run A's jobs alone in a fresh engine (same seed):
  losses rel 1e-5, logprobs atol 1e-4, grad norm rel 1e-4, saved LoRA factors atol 1e-5 (measured ~3e-9: with
  Tinker's default eps 1e-12 Adam's first step is ≈ lr·sign(g), insensitive to float reassociation noise; a
  larger eps such as 1e-6 amplifies that noise by lr/eps and was measured at ~5e-6);
- bad jobs (unknown run, a payload this worker cannot read) fail alone while the other jobs of the same tick —
  including later jobs of the same run — succeed (input the model cannot run never reaches a worker: the API
  validates it, tests/e2e/test_bad_input.py);
- a run's ops apply in seq order within one tick, `unload_model` included: a forward_backward followed by the
  run's unload both succeed, and the run is gone afterwards;
- a `save_weights_for_sampler` snapshot (ephemeral, with a sampling session) serves `sample` jobs; the
  snapshot is frozen while training goes on; a fresh engine loads it from the checkpoint store and samples the
  same tokens with the same seed; sampled logprobs equal the trainer's through the snapshot (atol 1e-4).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import (
    CheckpointTarget,
    ClaimedJob,
    CreateModelJob,
    ForwardBackwardJob,
    JobKind,
    JobPayload,
    OptimStepJob,
    RunLora,
    SampleJob,
    SaveWeightsForSamplerJob,
    SaveWeightsJob,
    TinkerPrompt,
    UnloadModelJob,
    UnreadablePayload,
    result_json,
)
from contract.settings import Settings
from loom.types import AdamParams, Datum, ForwardBackwardInput, ModelInput, SamplingParams, TensorData
from tests.unit.worker_fixtures import fresh_model, run_to_completion, token_ids
from worker.engine import Engine
from worker.service import build_engine
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

LP_ATOL = 1e-4
BASE = "loom/tiny-kimi-k2"
RUN_A, RUN_B = "sa:train:0", "sb:train:0"
SAMPLER_SESSION = "sb:sample:0"
ADAM = OptimStepJob(adam=AdamParams(learning_rate=5e-3))  # other AdamParams at Tinker defaults (eps 1e-12)


def job(owner: str, model_id: str | None, seq: int | None, payload: JobPayload, jid: str | None = None) -> ClaimedJob:
    return ClaimedJob(
        id=jid or f"{model_id}:{seq}",
        kind=payload.kind,
        owner=owner,
        base_model=BASE,
        model_id=model_id,
        seq_id=seq,
        payload=payload,
        fencing_token=7,
    )


def ce_payload(seqs: list[list[int]]) -> ForwardBackwardJob:
    data = [
        Datum(
            model_input=ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={
                "target_tokens": TensorData.from_list(s[1:], "int64"),
                "weights": TensorData.from_list([1.0] * (len(s) - 1), "float32"),
            },
        )
        for s in seqs
    ]
    return ForwardBackwardJob(input=ForwardBackwardInput(data=data, loss_fn="cross_entropy"))


def rl_payload(seq: list[int], advantages: list[float], loss: str = "importance_sampling") -> ForwardBackwardJob:
    n = len(seq) - 1
    datum = Datum(
        model_input=ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_list(seq[1:], "int64"),
            "logprobs": TensorData.from_list([-11.5] * n, "float32"),
            "advantages": TensorData.from_list(advantages, "float32"),
        },
    )
    return ForwardBackwardJob(input=ForwardBackwardInput(data=[datum], loss_fn=loss))


def create_payload(rank: int, seed: int, unembed: bool) -> CreateModelJob:
    return CreateModelJob(lora=RunLora(rank=rank, seed=seed, train_mlp=True, train_attn=True, train_unembed=unembed))


SEQ_A = [token_ids(9, seed=1), token_ids(6, seed=2)]
SEQ_B = token_ids(8, seed=3)
ADV_B = [1.0, 0.5, 2.0, 1.0, 0.25, 1.5, 1.0]


def run_a_jobs() -> list[ClaimedJob]:
    return [
        job("alice", RUN_A, 0, create_payload(4, 1, True)),
        job("alice", RUN_A, 1, ce_payload(SEQ_A)),
        job("alice", RUN_A, 2, ADAM),
        job("alice", RUN_A, 3, ce_payload(SEQ_A)),
        job(
            "alice",
            RUN_A,
            4,
            SaveWeightsJob(
                target=CheckpointTarget(checkpoint_id="weights/a1", tinker_path=f"tinker://{RUN_A}/weights/a1")
            ),
        ),
    ]


def run_b_jobs() -> list[ClaimedJob]:
    return [
        job("bob", RUN_B, 0, create_payload(8, 2, False)),
        job("bob", RUN_B, 1, rl_payload(SEQ_B, ADV_B)),
        job("bob", RUN_B, 2, ADAM),
        job("bob", RUN_B, 3, rl_payload(SEQ_B, ADV_B)),
        job(
            "bob",
            RUN_B,
            4,
            SaveWeightsForSamplerJob(
                target=CheckpointTarget(
                    checkpoint_id="sampler_weights/ephemeral-000000-seq4",
                    tinker_path=f"tinker://{RUN_B}/sampler_weights/ephemeral-000000-seq4",
                    ephemeral=True,
                ),
                sampling_session_id=SAMPLER_SESSION,
            ),
        ),
    ]


def sample_job(uri: str | None, seq: int, prompt: list[int], seed: int, num_samples: int = 2) -> ClaimedJob:
    payload = SampleJob(
        prompt=TinkerPrompt(model_input=ModelInput.from_ints(prompt), prompt_logprobs=True),
        sampling_params=SamplingParams(max_tokens=4, seed=seed, temperature=1.0),
        num_samples=num_samples,
        storage_uri=uri,
    )
    return job("bob", SAMPLER_SESSION, seq, payload, jid=f"{SAMPLER_SESSION}:{seq}")


def by_id(outcomes) -> dict:
    ids = [o.job.id for o in outcomes]
    assert len(ids) == len(set(ids)), "more than one outcome for a job"
    return {o.job.id: o for o in outcomes}


def wire(outcome) -> dict:
    """The result as the client receives it."""
    return result_json(outcome.result)


def fb_loss(outcome) -> float:
    return wire(outcome)["metrics"]["loss:sum"]


def fb_logprobs(outcome) -> list[torch.Tensor]:
    return [
        torch.tensor(o["logprobs"]["data"]).reshape(o["logprobs"]["shape"]) for o in wire(outcome)["loss_fn_outputs"]
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = LocalCheckpointStore(tmp_path_factory.mktemp("ckpt"))
    engine = Engine(fresh_model("tiny_kimi_k2"), store)
    jobs = run_a_jobs() + run_b_jobs()
    random.Random(0).shuffle(jobs)  # the engine must restore each run's seq order
    mixed = by_id(run_to_completion(engine, jobs))
    return {"store": store, "engine": engine, "jobs": jobs, "mixed": mixed}


@pytest.fixture(scope="module")
def alone(world):
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(world["store"].root.parent / "alone"))
    return by_id(run_to_completion(engine, list(reversed(run_a_jobs()))))


def test_one_successful_outcome_per_job(world):
    mixed = world["mixed"]
    assert set(mixed) == {j.id for j in world["jobs"]}
    for jid, o in mixed.items():
        assert o.error is None and o.category is None, f"{jid}: {o.error}"
        assert o.result is not None
    assert wire(mixed[f"{RUN_A}:0"]) == {"model_id": RUN_A, "type": "create_model"}
    assert wire(mixed[f"{RUN_A}:2"])["metrics"]["grad_norm:mean"] > 0
    assert wire(mixed[f"{RUN_A}:2"])["metrics"]["learning_rate:mean"] == pytest.approx(5e-3)
    lps = fb_logprobs(mixed[f"{RUN_A}:1"])
    assert [lp.shape for lp in lps] == [torch.Size([8]), torch.Size([5])]
    assert fb_logprobs(mixed[f"{RUN_B}:1"])[0].shape == torch.Size([7])
    assert wire(mixed[f"{RUN_A}:1"])["loss_fn_output_type"] == "ArrayRecord"


def test_fresh_adapter_loss_is_base_model_loss_and_finite(world):
    """Before any step B = 0: run A's first loss is the base model's CE (the adapter is a no-op)."""
    lm = world["engine"].lm
    expected = 0.0
    for s in SEQ_A:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([s[:-1]]), use_cache=False).logits[0].float()
        expected -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[1:])[:, None]).sum())
    assert fb_loss(world["mixed"][f"{RUN_A}:1"]) == pytest.approx(expected, rel=1e-5)


def test_losses_decrease_after_optim_step(world):
    mixed = world["mixed"]
    for run in (RUN_A, RUN_B):
        before, after = fb_loss(mixed[f"{run}:1"]), fb_loss(mixed[f"{run}:3"])
        assert math.isfinite(before) and math.isfinite(after)
        assert after < before - 1e-3, f"{run}: loss {before} → {after}"


def test_mixed_tick_equals_run_alone_in_fresh_engine(world, alone):
    mixed = world["mixed"]
    for seq in (1, 3):
        m, a = mixed[f"{RUN_A}:{seq}"], alone[f"{RUN_A}:{seq}"]
        assert fb_loss(m) == pytest.approx(fb_loss(a), rel=1e-5)
        for lm_, la in zip(fb_logprobs(m), fb_logprobs(a)):
            torch.testing.assert_close(lm_, la, atol=LP_ATOL, rtol=0)
    gm = wire(mixed[f"{RUN_A}:2"])["metrics"]["grad_norm:mean"]
    ga = wire(alone[f"{RUN_A}:2"])["metrics"]["grad_norm:mean"]
    assert gm == pytest.approx(ga, rel=1e-4)
    cm, ca = mixed[f"{RUN_A}:4"].checkpoint, alone[f"{RUN_A}:4"].checkpoint
    tm = load_file(str(Path(cm.storage_uri.removeprefix("file://")) / "adapter_model.safetensors"))
    ta = load_file(str(Path(ca.storage_uri.removeprefix("file://")) / "adapter_model.safetensors"))
    assert tm.keys() == ta.keys()
    assert any(".experts." in k for k in tm) and any("lm_head" in k for k in tm)
    moved = 0.0
    for k in tm:
        # Adam's first step moves each element by lr·g/(|g|+eps), about ±lr whatever |g| is: where a gradient is a
        # float32 cancellation residue (rare vocabulary rows of lm_head's B, |g| ~ 1e-7), the summation order of a
        # mixed batch alone can flip its sign, moving that element by up to 2·lr. Allow that on at most 0.01% of the
        # elements; every other element must agree to 1e-5.
        off = (tm[k] - ta[k]).abs()
        assert float(off.max()) <= 2 * ADAM.adam.learning_rate and int((off > 1e-5).sum()) <= off.numel() // 10_000, k
        if "lora_B" in k:
            moved = max(moved, float(tm[k].abs().max()))
    assert moved > 1e-3  # the step really changed B, so the comparison is not between two zero tensors


def test_save_weights_outcome_records_checkpoint(world):
    o = world["mixed"][f"{RUN_A}:4"]
    assert wire(o) == {"path": f"tinker://{RUN_A}/weights/a1", "type": "save_weights"}
    c = o.checkpoint
    assert (c.run_id, c.owner, c.checkpoint_id, c.kind, c.ephemeral) == (
        RUN_A,
        "alice",
        "weights/a1",
        "training",
        False,
    )
    folder = world["store"].open(c.storage_uri)  # committed, manifest verifies
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert c.size_bytes > 0


def test_bad_jobs_fail_alone_others_succeed(world):
    engine = world["engine"]
    unreadable = ClaimedJob(f"{RUN_B}:6", JobKind.OPTIM_STEP, "bob", BASE, RUN_B, 6, UnreadablePayload("boom"), 7)
    jobs = [
        job("bob", RUN_B, 5, rl_payload(SEQ_B, ADV_B)),
        unreadable,
        job("bob", RUN_B, 7, rl_payload(SEQ_B, ADV_B)),  # later job of the same run: fine
        job("eve", "nobody:train:0", 1, ce_payload(SEQ_A)),
        job("eve", "nobody:train:0", 2, ADAM),
        job("alice", RUN_A, 5, ce_payload(SEQ_A)),
        job("alice", RUN_A, 6, ADAM),
    ]
    out = by_id(run_to_completion(engine, jobs))
    assert set(out) == {j.id for j in jobs}
    for jid in ("nobody:train:0:1", "nobody:train:0:2"):
        assert out[jid].category == "user" and "not resident" in out[jid].error and out[jid].result is None
    assert out[f"{RUN_B}:6"].category == "server" and "boom" in out[f"{RUN_B}:6"].error
    for jid in (f"{RUN_B}:5", f"{RUN_B}:7", f"{RUN_A}:5", f"{RUN_A}:6"):
        assert out[jid].error is None and out[jid].result is not None, (jid, out[jid].error)
    # run B's state was not touched by its failed job: the same loss as its seq-3 forward (no step in between)
    for seq in (5, 7):
        assert fb_loss(out[f"{RUN_B}:{seq}"]) == pytest.approx(fb_loss(world["mixed"][f"{RUN_B}:3"]), rel=1e-5)


def test_unload_waits_for_the_runs_earlier_ops_in_the_same_tick(world):
    """Before the job contract, `unload_model` had no seq_id and ran before every chain of its tick, so the run's
    own forward_backward submitted before it failed with "not resident"."""
    engine = world["engine"]
    run = "sc:train:0"
    jobs = [
        job("carol", run, 2, UnloadModelJob()),
        job("carol", run, 1, ce_payload(SEQ_A)),
        job("carol", run, 0, create_payload(4, 3, False)),
    ]
    out = by_id(run_to_completion(engine, jobs))
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    assert math.isfinite(fb_loss(out[f"{run}:1"]))
    assert wire(out[f"{run}:2"]) == {"model_id": run, "type": "unload_model"}
    assert run not in engine.pool.runs


def _sampler_checkpoint(world):
    o = world["mixed"][f"{RUN_B}:4"]
    return o, o.checkpoint


def test_save_for_sampler_outcome(world):
    o, c = _sampler_checkpoint(world)
    assert wire(o) == {
        "path": f"tinker://{RUN_B}/sampler_weights/ephemeral-000000-seq4",
        "type": "save_weights_for_sampler",
        "sampling_session_id": SAMPLER_SESSION,
    }
    assert (c.kind, c.ephemeral, c.owner) == ("sampler", True, "bob")
    assert c.storage_uri.startswith("file://")
    assert not (Path(c.storage_uri.removeprefix("file://")) / "optimizer.safetensors").exists()


@pytest.fixture(scope="module")
def sampled(world):
    _, c = _sampler_checkpoint(world)
    prompt = token_ids(5, seed=40)
    first = by_id(run_to_completion(world["engine"], [sample_job(c.storage_uri, 1, prompt, seed=3)]))
    return {"prompt": prompt, "uri": c.storage_uri, "first": first[f"{SAMPLER_SESSION}:1"]}


def test_sample_from_ephemeral_snapshot(world, sampled):
    o = sampled["first"]
    assert o.error is None, o.error
    res = wire(o)
    assert res["type"] == "sample" and len(res["sequences"]) == 2
    engine = world["engine"]
    slot = engine.pool.samplers[sampled["uri"]]
    for seq in res["sequences"]:
        assert seq["stop_reason"] in ("length", "stop") and 1 <= len(seq["tokens"]) <= 4
        full = sampled["prompt"] + seq["tokens"]
        datum = TrainDatum(full[:-1], {"target_tokens": torch.tensor(full[1:])})
        ref = run_forward_backward(engine.lm, [WorkItem(slot, [datum], "cross_entropy", forward_only=True)])[0]
        lp = ref.logprobs[0][len(sampled["prompt"]) - 1 :]
        torch.testing.assert_close(torch.tensor(seq["logprobs"]), lp, atol=LP_ATOL, rtol=0)
    assert res["prompt_logprobs"][0] is None and len(res["prompt_logprobs"]) == len(sampled["prompt"])


def test_snapshot_is_frozen_while_training_continues(world, sampled):
    engine = world["engine"]
    out = by_id(
        run_to_completion(
            engine,
            [
                job("bob", RUN_B, 10, rl_payload(SEQ_B, ADV_B)),
                job("bob", RUN_B, 11, OptimStepJob(adam=AdamParams(learning_rate=5e-2))),
                sample_job(sampled["uri"], 2, sampled["prompt"], seed=3),
            ],
        )
    )
    assert out[f"{RUN_B}:11"].error is None
    again = wire(out[f"{SAMPLER_SESSION}:2"])
    first = wire(sampled["first"])
    assert [s["tokens"] for s in again["sequences"]] == [s["tokens"] for s in first["sequences"]]
    for a, b in zip(again["sequences"], first["sequences"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-6)


def test_fresh_engine_loads_snapshot_from_store(world, sampled):
    engine = Engine(fresh_model("tiny_kimi_k2"), world["store"])
    assert not engine.pool.samplers
    out = by_id(run_to_completion(engine, [sample_job(sampled["uri"], 3, sampled["prompt"], seed=3)]))[
        f"{SAMPLER_SESSION}:3"
    ]
    assert out.error is None, out.error
    first = wire(sampled["first"])
    assert [s["tokens"] for s in wire(out)["sequences"]] == [s["tokens"] for s in first["sequences"]]
    for a, b in zip(wire(out)["sequences"], first["sequences"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=LP_ATOL)
    # and a different seed gives a different sample (the check above is not trivially true)
    other = by_id(run_to_completion(engine, [sample_job(sampled["uri"], 4, sampled["prompt"], seed=4)]))[
        f"{SAMPLER_SESSION}:4"
    ]
    assert [s["tokens"] for s in wire(other)["sequences"]] != [s["tokens"] for s in first["sequences"]]


def test_sample_base_model_and_bad_uri(world, sampled, tmp_path):
    engine = world["engine"]
    missing = (tmp_path / "nope").as_uri()
    out = by_id(
        run_to_completion(
            engine,
            [
                sample_job(None, 5, sampled["prompt"], seed=3, num_samples=1),
                sample_job(missing, 6, sampled["prompt"], seed=3, num_samples=1),
            ],
        )
    )
    base = out[f"{SAMPLER_SESSION}:5"]
    assert base.error is None and len(wire(base)["sequences"]) == 1
    bad = out[f"{SAMPLER_SESSION}:6"]
    assert bad.category == "user" and bad.result is None


def test_train_token_budget_comes_from_settings(tmp_path, monkeypatch):
    """`LOOM_TRAIN_TOKEN_BUDGET` reaches the engine `build_engine` makes (default 2048)."""
    assert Settings().train_token_budget == 2048
    monkeypatch.setenv("LOOM_TRAIN_TOKEN_BUDGET", "64")
    settings = Settings(data_dir=tmp_path)
    engine = build_engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "ckpt"), settings)
    assert engine.train_token_budget == 64
