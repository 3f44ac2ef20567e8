"""The official `tinker` SDK (0.38, protobuf forward_backward and sample results) drives real training loops.

SL: loss per token must fall by more than half over 6 pipelined steps. RL: the mean reward of a seeded group on a
verifiable task must rise. Also covers save_state/load_state(_with_optimizer), named sampler weights, the
tiny Kimi K2 (DeepSeek-V3 MoE) base model and forward-only passes. The tokenizer comes from the server's Hugging Face
Hub routes, as the SDK's `get_tokenizer()` gets it with `HF_ENDPOINT` set (test_tokenizers.py checks that itself).
"""

from __future__ import annotations

import pytest
import tinker
from tinker import types

from examples.rl_loop import PROMPT, reward, rl_batch
from examples.sl_loop import make_datum

pytestmark = pytest.mark.e2e

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KIMI = "loom/tiny-kimi-k2"


def test_sl_loop_loss_falls_and_state_round_trips(tinker_env, tokenizer_of) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=SMOL, rank=8, seed=1).result()
    tokenizer = tokenizer_of(SMOL)
    batch = [make_datum(tokenizer, "Capital of France?", "Paris."), make_datum(tokenizer, "Capital of Peru?", "Lima.")]
    losses = []
    for _ in range(6):
        fb = training.forward_backward(batch, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert losses[-1] < 0.5 * losses[0], losses

    saved = training.save_state("e2e-sl").result().path
    assert saved.startswith("tinker://") and saved.endswith("/weights/e2e-sl")
    after = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]

    restored = service.create_training_client_from_state_with_optimizer(saved).result()
    same = restored.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert same == pytest.approx(after, rel=1e-5)
    # The restored Adam moments make the next step identical on both clients.
    for client in (training, restored):
        client.forward_backward(batch, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    a = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    b = restored.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-4)

    sampler_path = training.save_weights_for_sampler("e2e-sampler").result().path
    sampler = service.create_sampling_client(model_path=sampler_path).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("Q: Capital of France?\nA:"))
    out = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert "Paris" in tokenizer.decode(out.sequences[0].tokens)


def test_rl_loop_reward_rises(tinker_env, tokenizer_of) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=SMOL, rank=8, seed=2).result()
    tokenizer = tokenizer_of(SMOL)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    rewards = []
    for step in range(6):
        sampler = training.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + step, stop=["\n"])
        result = sampler.sample(types.ModelInput.from_ints(prompt), 12, params).result()
        scores = [reward(tokenizer.decode(s.tokens)) for s in result.sequences]
        assert all(len(s.logprobs) == len(s.tokens) for s in result.sequences)
        rewards.append(sum(scores) / len(scores))
        batch = rl_batch(types, prompt, result.sequences, scores)
        training.forward_backward(batch, "importance_sampling").result()
        training.optim_step(types.AdamParams(learning_rate=3e-4)).result()
    assert max(rewards[-2:]) > rewards[0], rewards


def test_kimi_k2_moe_trains_and_samples_with_prompt_logprobs(tinker_env) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=KIMI, rank=4, train_unembed=False, seed=3).result()
    tokens = list(range(100, 116))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    first = training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    second = training.forward([datum], "cross_entropy").result()
    assert second.metrics["loss:sum"] < first.metrics["loss:sum"]
    logprobs = first.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(logprobs) == len(tokens) - 1

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokens[:-1])
    res = sampler.sample(
        prompt,
        2,
        types.SamplingParams(max_tokens=3, temperature=1.0, seed=7),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    assert len(res.sequences) == 2 and all(len(s.tokens) == 3 for s in res.sequences)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(tokens) - 1
    assert all(len(top) == 3 for top in res.topk_prompt_logprobs[1:])
    # The sampler scores the prompt with the snapshot's weights: same as the trainer's logprobs now.
    trained = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert res.prompt_logprobs[1:] == pytest.approx(trained[:-1], abs=1e-4)
