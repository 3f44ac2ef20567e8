"""One tenant's hostile request never changes another tenant's results in the shared worker tick.

Two-tenant harness at engine level (tiny Kimi K2): tenant B runs create → forward_backward (ppo) → optim_step →
forward_backward (cross_entropy) → save_weights_for_sampler, then samples from its snapshot (seeded). Tenant A's
jobs share B's ticks — its forward_backward is in B's mixed pass, its sample in B's decode batch — and carry one
hostile request per scenario:
- `loss_raises`: a ppo datum whose advantages have the wrong length (the loss raises): A's request fails alone
  as a `user` error naming the loss; A's run survives (its next forward_backward succeeds);
- `clip_tensor`: a ppo datum with a per-token `clip_high_threshold` (and the low bound from config) — it used to
  fail the whole pass with a TypeError; now it succeeds with the hand-computed loss;
- `nan_adapter`: A's adapter driven to non-finite outputs by an optim_step with learning rate 1e30 (weights
  ±1e30 stay finite, so the step is allowed): A's sample fails alone as a `user` error about non-finite logits;
- `huge_seed`: A samples with seed 2**64 (past a torch generator's range): it is folded into that range, so A
  gets the same tokens as with seed 0 and B is untouched.
In every scenario B's outcomes equal those of B's jobs run in a fresh engine without A: sampled tokens exactly,
logprobs / losses / grad norms within the mixed-batch tolerances (atol 1e-4, rel 1e-5 / 1e-4), because fault
isolation restores the accumulated gradients before rerunning the survivors.

Also: a request that makes the batched forward itself raise (prefill) fails alone and the jobs that shared its
batch, rerun alone, give the same tokens; an optim_step that would make the weights non-finite is refused as a `user` error and changes nothing
(weights, gradients, later steps equal a run that never tried it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch

from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import (
    CheckpointTarget,
    ClaimedJob,
    ForwardBackwardJob,
    OptimStepJob,
    SampleJob,
    SaveWeightsForSamplerJob,
    TinkerPrompt,
)
from loom.types import AdamParams, Datum, ForwardBackwardInput, ModelInput, SamplingParams, TensorData
from tests.unit.test_worker_engine import (
    ADAM,
    by_id,
    ce_payload,
    create_payload,
    fb_logprobs,
    fb_loss,
    job,
    rl_payload,
    wire,
)
from tests.unit.worker_fixtures import fresh_model, run_to_completion, token_ids
from worker.engine import Engine

LP_ATOL = 1e-4
RUN_A, RUN_B = "sa:train:0", "sb:train:0"
SEQ = token_ids(8, seed=3)
ADV = [1.0, 0.5, 2.0, -1.0, 0.25, 1.5, -0.5]
PROMPT = token_ids(5, seed=7)


def unchecked_adam(learning_rate: float) -> AdamParams:
    """Adam parameters past the API's bound (`loom.types.limits.MAX_LEARNING_RATE`): the worker must cope anyway."""
    return AdamParams.model_construct(**(AdamParams().model_dump() | {"learning_rate": learning_rate}))


def snapshot_job(owner: str, run: str, seq: int) -> ClaimedJob:
    name = f"sampler_weights/ephemeral-{seq}"
    target = CheckpointTarget(checkpoint_id=name, tinker_path=f"tinker://{run}/{name}", ephemeral=True)
    return job(owner, run, seq, SaveWeightsForSamplerJob(target=target, sampling_session_id=f"{run}:s"))


def sample(owner: str, uri: str | None, jid: str, seed: int) -> ClaimedJob:
    payload = SampleJob(
        prompt=TinkerPrompt(model_input=ModelInput.from_ints(PROMPT)),
        sampling_params=SamplingParams(max_tokens=6, seed=0, temperature=1.0),
        num_samples=2,
        storage_uri=uri,
    )
    payload.sampling_params.seed = seed  # unchecked: the API refuses seeds past 64 bits, the worker must cope anyway
    return job(owner, f"{owner}:sample", None, payload, jid=jid)


def b_training() -> list[ClaimedJob]:
    return [
        job("bob", RUN_B, 0, create_payload(8, 2, False)),
        job("bob", RUN_B, 1, rl_payload(SEQ, ADV, "ppo")),
        job("bob", RUN_B, 2, ADAM),
        job("bob", RUN_B, 3, ce_payload([SEQ, token_ids(6, seed=4)])),
        snapshot_job("bob", RUN_B, 4),
    ]


def ppo_payload(extra: dict[str, TensorData], config: dict[str, float] | None = None) -> ForwardBackwardJob:
    payload = rl_payload(SEQ, ADV, "ppo")
    datum = payload.input.data[0]
    inputs = {**datum.loss_fn_inputs, **extra}
    data = [Datum(model_input=datum.model_input, loss_fn_inputs=inputs)]
    return ForwardBackwardJob(input=ForwardBackwardInput(data=data, loss_fn="ppo", loss_fn_config=config))


CLIP_HIGH = [1.01, 1.5, 1.02, 1.3, 1.05, 1.01, 1.2]
CLIP_Q = [-12.2, -11.5, -12.5, -11.0, -12.3, -12.0, -13.0]
"""Sampler logprobs putting the ratios on both sides of the clip band (the learner's are ≈ -11.6 .. -12.0)."""


def a_training(scenario: str) -> list[ClaimedJob]:
    create = job("alice", RUN_A, 0, create_payload(4, 1, True))
    match scenario:
        case "loss_raises":
            bad = ppo_payload({"advantages": TensorData.from_list([1.0, 2.0], "float32")})
            return [create, job("alice", RUN_A, 1, bad), job("alice", RUN_A, 2, ce_payload([SEQ]))]
        case "clip_tensor":
            clip = {
                "clip_high_threshold": TensorData.from_list(CLIP_HIGH, "float32"),
                "logprobs": TensorData.from_list(CLIP_Q, "float32"),
            }
            return [create, job("alice", RUN_A, 1, ppo_payload(clip, {"clip_low_threshold": 0.9}))]
        case "nan_adapter":
            huge = OptimStepJob(adam=unchecked_adam(1e30))
            return [create, job("alice", RUN_A, 1, ce_payload([SEQ])), job("alice", RUN_A, 2, huge)] + [
                snapshot_job("alice", RUN_A, 3)
            ]
        case _:
            return [create]


def uri_of(outcomes: dict, jid: str) -> str:
    return outcomes[jid].checkpoint.storage_uri


def tick_pair(engine: Engine, a_jobs: list[ClaimedJob], a_sample_seed: int | None, scenario: str) -> dict:
    """Training tick, then a sampling tick: B's sample, and A's (from A's snapshot, else the base model)."""
    trained = by_id(run_to_completion(engine, b_training() + a_jobs))
    samples = [sample("bob", uri_of(trained, f"{RUN_B}:4"), "b-sample", 5)]
    if a_sample_seed is not None:
        a_uri = uri_of(trained, f"{RUN_A}:3") if scenario == "nan_adapter" else None
        samples.append(sample("alice", a_uri, "a-sample", a_sample_seed))
    return trained | by_id(run_to_completion(engine, samples))


SCENARIOS = {"loss_raises": None, "clip_tensor": None, "nan_adapter": 11, "huge_seed": 2**64}


@pytest.fixture(scope="module")
def b_alone(tmp_path_factory) -> dict:
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path_factory.mktemp("alone")))
    return tick_pair(engine, [], None, "")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Callable[[str], tuple[dict, Engine]]:
    """Each scenario's outcomes (all jobs of both tenants) and its engine, computed once per module."""

    @functools.cache
    def run(scenario: str) -> tuple[dict, Engine]:
        engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path_factory.mktemp(scenario)))
        return tick_pair(engine, a_training(scenario), SCENARIOS[scenario], scenario), engine

    return run


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_b_results_equal_b_alone(shared, b_alone, scenario):
    mixed, _ = shared(scenario)
    for jid, alone in b_alone.items():
        got = mixed[jid]
        assert got.error is None, f"{scenario}: B's {jid} failed: {got.error}"
        if isinstance(got.job.payload, ForwardBackwardJob):
            assert fb_loss(got) == pytest.approx(fb_loss(alone), rel=1e-5)
            for lp_mixed, lp_alone in zip(fb_logprobs(got), fb_logprobs(alone), strict=True):
                torch.testing.assert_close(lp_mixed, lp_alone, atol=LP_ATOL, rtol=0)
        elif isinstance(got.job.payload, OptimStepJob):
            got_norm, alone_norm = (wire(o)["metrics"]["grad_norm:mean"] for o in (got, alone))
            assert got_norm == pytest.approx(alone_norm, rel=1e-4)
        elif isinstance(got.job.payload, SampleJob):
            got_seqs, alone_seqs = got.result.sequences, alone.result.sequences
            assert [s.tokens for s in got_seqs] == [s.tokens for s in alone_seqs]
            for s_got, s_alone in zip(got_seqs, alone_seqs):
                assert s_got.logprobs == pytest.approx(s_alone.logprobs, abs=LP_ATOL)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_fails_alone_with_a_clear_error(shared, scenario):
    mixed, engine = shared(scenario)
    a_outcomes = {jid: o for jid, o in mixed.items() if jid.startswith(RUN_A) or jid == "a-sample"}
    failed = {jid: o for jid, o in a_outcomes.items() if o.error is not None}
    match scenario:
        case "loss_raises":
            assert failed.keys() == {f"{RUN_A}:1"}
            assert failed[f"{RUN_A}:1"].category == "user"
            assert "ppo failed on datum 0" in failed[f"{RUN_A}:1"].error
            assert math.isfinite(fb_loss(mixed[f"{RUN_A}:2"]))  # A's run itself was not lost
        case "nan_adapter":
            assert failed.keys() == {"a-sample"}
            assert failed["a-sample"].category == "user"
            assert "non-finite logits" in failed["a-sample"].error
            assert not engine.busy and not engine.in_flight()
            assert not engine.pool.pinned  # the failed job's snapshot was unpinned
        case _:
            assert not failed
    if SCENARIOS[scenario] is not None:
        assert "a-sample" in mixed  # a sample request always completes (a huge seed once left it hanging)


def test_per_token_clip_loss_is_the_hand_computed_value(shared):
    mixed, _ = shared("clip_tensor")
    lp = fb_logprobs(mixed[f"{RUN_A}:1"])[0].tolist()
    expected = 0.0
    ratios = [math.exp(logprob - q) for logprob, q in zip(lp, CLIP_Q, strict=True)]
    expected = 0.0
    for ratio, adv, high in zip(ratios, ADV, CLIP_HIGH):
        expected -= min(ratio * adv, min(max(ratio, 0.9), high) * adv)
    assert fb_loss(mixed[f"{RUN_A}:1"]) == pytest.approx(expected, rel=1e-5)
    # both per-token high bounds and the configured low bound really clip some token
    assert any(r > high and adv > 0 for r, high, adv in zip(ratios, CLIP_HIGH, ADV))
    assert any(r < 0.9 and adv < 0 for r, adv in zip(ratios, ADV))


def test_huge_seed_is_folded_into_the_generator_range(shared, tmp_path):
    mixed, _ = shared("huge_seed")
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path))
    zero = by_id(run_to_completion(engine, [sample("alice", None, "a-sample", 0)]))["a-sample"]
    assert [s.tokens for s in mixed["a-sample"].result.sequences] == [s.tokens for s in zero.result.sequences]


# ------------------------------------------------------------------------------------------- optimizer guard


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.pool.run(RUN_B).adapter.named_parameters()}


def _grads(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in engine.pool.run(RUN_B).adapter.named_parameters()}


def test_non_finite_optim_step_is_refused_and_changes_nothing(tmp_path):
    guarded = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "guarded"))
    clean = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "clean"))
    first = b_training()[:2]
    for engine in (guarded, clean):
        assert all(o.error is None for o in run_to_completion(engine, first))
    weights, grads = _weights(guarded), _grads(guarded)
    bad = job("bob", RUN_B, 2, OptimStepJob(adam=unchecked_adam(1e39)))  # inf in float32
    (refused,) = run_to_completion(guarded, [bad])
    assert refused.category == "user" and "optim_step refused" in refused.error
    for name, tensor in _weights(guarded).items():
        assert torch.equal(tensor, weights[name]), name
    for name, tensor in _grads(guarded).items():
        assert torch.equal(tensor, grads[name]), name
    assert guarded.pool.run(RUN_B).optimizer.steps == 0
    later = [job("bob", RUN_B, 3, ADAM), job("bob", RUN_B, 4, ce_payload([SEQ]))]
    after_guard = by_id(run_to_completion(guarded, later))
    after_clean = by_id(run_to_completion(clean, [job("bob", RUN_B, 2, ADAM), job("bob", RUN_B, 3, ce_payload([SEQ]))]))
    assert all(o.error is None for o in after_guard.values())
    assert fb_loss(after_guard[f"{RUN_B}:4"]) == fb_loss(after_clean[f"{RUN_B}:3"])
    for name, tensor in _weights(guarded).items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, _weights(clean)[name]), name


def test_a_failed_prefill_fails_its_jobs_instead_of_losing_them(tmp_path, monkeypatch):
    """A batched forward that raises is not confined to a row: the jobs it held fail (server), none hangs."""
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path))

    def exploding_prefill(works, tags):
        raise RuntimeError("prefill exploded")

    monkeypatch.setattr(engine.sampling.batch, "admit", exploding_prefill)
    outcomes = by_id(run_to_completion(engine, [sample("alice", None, "a-sample", 1)]))
    assert outcomes["a-sample"].category == "server" and "prefill exploded" in outcomes["a-sample"].error
    assert not engine.busy and not engine.in_flight()


POISON = 4242


def test_a_request_that_breaks_the_batched_forward_fails_alone(tmp_path, monkeypatch):
    """A prompt the model's forward cannot take (here: a token that makes it raise) fails its own job only; the
    jobs that shared its prefill are rerun alone and give exactly the tokens they give without it."""

    def poisoned(model):
        forward = model.forward

        def guarded(*args, input_ids=None, **kwargs):
            if input_ids is not None and bool((input_ids == POISON).any()):
                raise RuntimeError("the forward cannot take this input")
            return forward(*args, input_ids=input_ids, **kwargs)

        monkeypatch.setattr(model, "forward", guarded)

    clean = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "clean"))
    want = by_id(run_to_completion(clean, [sample("bob", None, "b-1", 1), sample("bob", None, "b-2", 2)]))
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path / "shared"))
    poisoned(engine.lm.model)
    bad = sample("alice", None, "a-poison", 3)
    bad.payload.prompt.model_input.chunks[0].tokens[2] = POISON  # unchecked: stands for any input that breaks it
    got = by_id(run_to_completion(engine, [sample("bob", None, "b-1", 1), bad, sample("bob", None, "b-2", 2)]))

    assert got["a-poison"].category == "server" and "cannot take this input" in got["a-poison"].error
    for jid in ("b-1", "b-2"):
        assert got[jid].error is None, got[jid].error
        for seq, ref in zip(wire(got[jid])["sequences"], wire(want[jid])["sequences"], strict=True):
            assert seq["tokens"] == ref["tokens"]  # rerun alone, not in one batch: logprobs within float noise
            assert seq["logprobs"] == pytest.approx(ref["logprobs"], abs=LP_ATOL)
    assert not engine.busy and not engine.in_flight()
