"""Our own SDK (`loom`, client/) runs the SL and RL loops against a real server, sync and async, and surfaces
server-side validation as typed errors with the machine-readable code."""

from __future__ import annotations

import asyncio

import pytest

import loom
from examples.rl_loop import PROMPT, reward, rl_batch
from loom import types

pytestmark = pytest.mark.e2e

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def service(server):
    with loom.ServiceClient(base_url=server.url, api_key=server.api_key) as client:
        yield client


def datum(tokens: list[int], **extra: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **extra},
    )


def test_sl_loop_and_checkpoint_sampling(service) -> None:
    trainer = service.create_lora_training_client(SMOL, rank=8, seed=4)
    tokenizer = trainer.get_tokenizer()
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    batch = [datum(tokens)]
    losses = []
    for _ in range(5):
        fb = trainer.forward_backward(batch, "cross_entropy")
        step = trainer.optim_step(types.AdamParams(learning_rate=2e-3))
        losses.append(fb.result().metrics["loss:sum"])
        assert step.result().metrics["learning_rate:mean"] == pytest.approx(2e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    path = trainer.save_weights_for_sampler("sdk-sl").result().path
    sampler = service.create_sampling_client(model_path=path)
    out = sampler.sample(
        types.ModelInput.from_ints(tokens[:4]), 1, types.SamplingParams(max_tokens=5, temperature=0.0)
    ).result()
    assert out.sequences[0].tokens == tokens[4:9]  # it learned the sentence
    runs = service.create_rest_client().list_training_runs().result().training_runs
    assert trainer.model_id in [r.training_run_id for r in runs]


def test_async_rl_loop_reward_rises(service) -> None:
    async def loop() -> list[float]:
        trainer = await service.create_lora_training_client_async(SMOL, rank=8, seed=5)
        tokenizer = trainer.get_tokenizer()
        prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
        rewards = []
        for step in range(6):
            sampler = await trainer.save_weights_and_get_sampling_client_async()
            params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=2000 + step, stop=["\n"])
            res = await sampler.sample_async(types.ModelInput.from_ints(prompt), 12, params)
            scores = [reward(tokenizer.decode(s.tokens)) for s in res.sequences]
            rewards.append(sum(scores) / len(scores))
            batch = rl_batch(types, prompt, res.sequences, scores)
            fb = await trainer.forward_backward_async(batch, "importance_sampling")
            opt = await trainer.optim_step_async(types.AdamParams(learning_rate=3e-4))
            await fb
            await opt.result_async()
        return rewards

    rewards = asyncio.run(loop())
    assert max(rewards[-2:]) > rewards[0], rewards


def test_validation_errors_are_typed(service) -> None:
    trainer = service.create_lora_training_client(SMOL, rank=4)
    with pytest.raises(loom.BadRequestError) as caught:
        trainer.forward_backward([datum([10**9, 1, 2])], "cross_entropy").result()
    assert caught.value.code == "invalid_request" and caught.value.param == "data.0.model_input"
    with pytest.raises(loom.NotFoundError):
        service.create_sampling_client(model_path=f"tinker://{trainer.model_id}/sampler_weights/missing")
    # The rejected request used no seq_id: training continues normally.
    assert trainer.forward_backward([datum([1, 2, 3])], "cross_entropy").result().metrics["loss:sum"] > 0
