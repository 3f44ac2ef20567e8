"""The official `tinker` SDK 0.38 trains with every loss it knows beyond the classic five, against a real server.

- `gspo` and `stable_reinforce` on sampled datums built as tinker-cookbook 0.6.1's `rl_loop` builds them (a
  `sequence_ratio_mask` over the sampled tokens; provenance naming the sequences of a sampling client made with
  `record_stability_info=True`): each `loss:sum` equals a reference computed here from the learner's logprobs
  (a `forward` just before) and the sampler's logprobs, and the optimizer step changes the weights.
- `forward_backward_custom` with a loss from `ServiceClient.create_custom_loss`: the server turns
  `custom_loss_server_side` on, so the loss is uploaded (`create_custom_loss`) and run in one server-side pass. Its
  loss and metrics equal the same function applied to `forward` logprobs, and one Adam step with it moves the
  weights as the SDK's own client-side path (the same handle without its loss id: forward, local autograd,
  cross-entropy surrogate) moves an identical twin run.

Tolerances: learner logprobs of `forward` and `forward_backward` agree to ~1e-5 (same weights, possibly other
micro-batches), so loss sums are compared at rel 1e-4; the twin runs' post-step logprobs at 1e-4 while the step
itself moves them by more than 1e-2 (both paths accumulate the same gradient: the surrogate's weights are exactly
-dC/dlogprobs).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import tinker
import torch
from tinker import types

from examples.rl_loop import PROMPT

pytestmark = pytest.mark.e2e

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]


def _sample(service: tinker.ServiceClient, tokenizer, seed: int):
    training = service.create_lora_training_client(base_model=SMOL, rank=8, seed=seed).result()
    prompt = tokenizer.encode(PROMPT)
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=seed)
    sequences = sampler.sample(types.ModelInput.from_ints(prompt), len(ADVANTAGES), params).result().sequences
    return training, prompt, sequences


def _datums(prompt: list[int], sequences, loss_fn: str) -> list[types.Datum]:
    """tinker-cookbook 0.6.1 `recipes/rl_loop.py`'s datums, for `gspo` or `stable_reinforce`."""
    datums = []
    for seq, advantage in zip(sequences, ADVANTAGES):
        ob_len = len(prompt) - 1
        tokens = prompt + list(seq.tokens)
        inputs = {
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * ob_len + list(seq.logprobs),
            "advantages": [0.0] * ob_len + [advantage] * len(seq.tokens),
        }
        if loss_fn == "gspo":
            inputs["sequence_ratio_mask"] = [0.0] * ob_len + [1.0] * len(seq.tokens)
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
        if loss_fn == "stable_reinforce":
            sid = seq.sequence_id
            datum = datum.with_provenance(
                model_input=[
                    types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                    types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens) - 1),
                ],
                loss_fn_inputs=[
                    types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
                    types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens)),
                ],
            )
        datums.append(datum)
    return datums


def _logprobs(training, datums, loss_fn: str = "cross_entropy", config=None) -> list[list[float]]:
    """The learner's target logprobs (a forward pass: no gradient, no change)."""
    outputs = training.forward(datums, loss_fn, config).result().loss_fn_outputs
    return [out["logprobs"].tolist() for out in outputs]


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def _gspo_reference(lp: list[float], seq, advantage: float, ob_len: int) -> float:
    sampled = lp[ob_len:]
    s = math.exp(sum(a - b for a, b in zip(sampled, seq.logprobs)) / len(sampled))
    clipped = min(max(s, 1 - 3e-4), 1 + 4e-4)
    return -len(sampled) * min(s * advantage, clipped * advantage)


def _stable_reference(lp: list[float], seq, advantage: float, ob_len: int, kl_coeff: float) -> float:
    total = 0.0
    for learner, sampler in zip(lp[ob_len:], seq.logprobs):
        r = math.exp(learner - sampler)
        total += -min(r, 2.0) * learner * advantage + kl_coeff * (r - 1 - (learner - sampler))
    return total


@pytest.mark.parametrize("loss_fn", ["gspo", "stable_reinforce"])
def test_sequence_losses_match_their_formula_and_train(tinker_env, tokenizer_of, loss_fn) -> None:
    service = tinker.ServiceClient()
    training, prompt, sequences = _sample(service, tokenizer_of(SMOL), seed=11)
    datums = _datums(prompt, sequences, loss_fn)
    config = {"kl_coeff": 0.05} if loss_fn == "stable_reinforce" else None
    before = _logprobs(training, datums, loss_fn, config)
    result = training.forward_backward(datums, loss_fn, config).result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    ob_len = len(prompt) - 1
    if loss_fn == "gspo":
        refs = [_gspo_reference(lp, s, a, ob_len) for lp, s, a in zip(before, sequences, ADVANTAGES)]
    else:
        refs = [_stable_reference(lp, s, a, ob_len, 0.05) for lp, s, a in zip(before, sequences, ADVANTAGES)]
    loss = result.metrics["loss:sum"]
    assert math.isfinite(loss) and loss == pytest.approx(sum(refs), rel=1e-4, abs=1e-4)
    for out, lp in zip(result.loss_fn_outputs, before):
        assert out["logprobs"].tolist() == pytest.approx(lp, abs=1e-4)
    after = _logprobs(training, datums, loss_fn, config)
    assert _max_gap(after, before) > 1e-3, "the optimizer step left the weights unchanged"


def _floats(values: list[float]) -> types.TensorData:
    """A float input the SDK has no default dtype for (a custom loss's own key)."""
    return types.TensorData(data=values, dtype="float32", shape=[len(values)])


def margin(logprobs, target_logprobs):
    """A custom loss (not a built-in): squared hinge of the learner's logprobs under a target margin."""
    gap = torch.relu(target_logprobs - logprobs)
    loss = (gap * gap).sum()
    return loss, {"custom/margin:sum": loss, "custom/gap:mean": gap.mean()}


def test_forward_backward_custom_runs_server_side_like_the_client_side_path(tinker_env, tokenizer_of) -> None:
    service = tinker.ServiceClient()
    handle = service.create_custom_loss(margin, {"logprobs": 1, "target_logprobs": 1}).result()
    assert handle.loss_id is not None, "the server did not take the loss (custom_loss_server_side)"
    server_side = service.create_lora_training_client(base_model=SMOL, rank=8, seed=5).result()
    client_side = service.create_lora_training_client(base_model=SMOL, rank=8, seed=5).result()
    tokenizer = tokenizer_of(SMOL)
    datums, probes = [], []  # probes: the same sequences, for cross_entropy forwards
    for text in ("Q: Is the sky green?\nA: No.", "Q: Capital of Peru?\nA: Lima."):
        tokens = tokenizer.encode(text)
        model_input = types.ModelInput.from_ints(tokens[:-1])
        targets = {"target_tokens": tokens[1:]}
        datums.append(
            types.Datum(
                model_input=model_input, loss_fn_inputs=targets | {"target_logprobs": _floats([-1.0] * len(tokens[1:]))}
            )
        )
        probes.append(types.Datum(model_input=model_input, loss_fn_inputs=targets))
    before = _logprobs(server_side, probes)
    twin = _logprobs(client_side, probes)
    assert _max_gap(before, twin) < 1e-6  # identical twins

    remote = server_side.forward_backward_custom(datums, handle).result()
    local = client_side.forward_backward_custom(datums, dataclasses.replace(handle, loss_id=None)).result()
    assert "surrogate_loss:sum" in local.metrics and "surrogate_loss:sum" not in remote.metrics  # the two paths

    reference = [margin(torch.tensor(lp), torch.tensor([-1.0] * len(lp))) for lp in before]
    ref_loss = sum(float(loss) for loss, _ in reference)
    for result in (remote, local):
        assert result.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-4)
        assert result.metrics["custom/margin:sum"] == pytest.approx(ref_loss, rel=1e-4)
        mean_gap = sum(float(m["custom/gap:mean"]) for _, m in reference) / len(reference)
        assert result.metrics["custom/gap:mean"] == pytest.approx(mean_gap, rel=1e-4)

    for training in (server_side, client_side):
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after_remote, after_local = _logprobs(server_side, probes), _logprobs(client_side, probes)
    step, twins = _max_gap(after_remote, before), _max_gap(after_remote, after_local)
    assert step > 1e-2 and twins < 1e-4, (step, twins)
