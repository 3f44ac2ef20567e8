"""On-policy RL with the official `tinker` SDK against a Loom server (unmodified Tinker code).

    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...   # printed by `loom serve`
    export HF_ENDPOINT=$TINKER_BASE_URL/hf   # get_tokenizer() loads the server's tokenizer from Loom, not the hub
    python examples/rl_loop.py [--steps 12]

Verifiable toy task: the answer to "Is the sky green?" must start with "No". Each step snapshots the weights
(`save_weights_and_get_sampling_client`), samples a group of answers with logprobs, scores them, and trains with
`importance_sampling` on group-centred advantages. Prints the mean reward per step, which rises.
"""

from __future__ import annotations

import argparse

import tinker
from tinker import types

PROMPT = "<|im_start|>user\nIs the sky green? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n"


def reward(text: str) -> float:
    return 1.0 if text.strip().lower().startswith("no") else 0.0


def rl_batch(wire_types, prompt: list[int], sequences, rewards: list[float]) -> list:
    """importance_sampling datums with group-centred advantages on the sampled tokens.

    `wire_types` is the SDK's types module (`tinker.types` or `loom.types`): the loop is the same for both.
    """
    mean = sum(rewards) / len(rewards)
    n_prompt = len(prompt) - 1
    batch = []
    for seq, r in zip(sequences, rewards):
        tokens = prompt + list(seq.tokens)
        batch.append(
            wire_types.Datum(
                model_input=wire_types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [r - mean] * len(seq.tokens),
                },
            )
        )
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()

    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=args.base_model, rank=16).result()
    tokenizer = training.get_tokenizer()
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, stop=["\n"])
    rewards_per_step = []
    for step in range(args.steps):
        sampler = training.save_weights_and_get_sampling_client().result()
        result = sampler.sample(
            types.ModelInput.from_ints(prompt), num_samples=args.group, sampling_params=params
        ).result()
        rewards = [reward(tokenizer.decode(seq.tokens)) for seq in result.sequences]
        mean = sum(rewards) / len(rewards)
        rewards_per_step.append(mean)
        batch = rl_batch(types, prompt, result.sequences, rewards)
        fb = training.forward_backward(batch, "importance_sampling")
        opt = training.optim_step(types.AdamParams(learning_rate=args.lr))
        fb.result()
        opt.result()
        print(f"step {step}: mean reward {mean:.3f}", flush=True)
    print(f"reward {rewards_per_step[0]:.3f} -> {rewards_per_step[-1]:.3f}")


if __name__ == "__main__":
    main()
