"""Supervised fine-tuning with the official `tinker` SDK against a Loom server (unmodified Tinker code).

    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...   # printed by `loom serve`
    export HF_ENDPOINT=$TINKER_BASE_URL/hf   # get_tokenizer() loads the server's tokenizer from Loom, not the hub
    python examples/sl_loop.py [--steps 8] [--base-model HuggingFaceTB/SmolLM2-135M-Instruct]

Teaches the model a fixed answer format; forward_backward and optim_step are submitted before waiting on either
(pipelined), as the Tinker docs recommend. Prints the per-token loss per step, which falls.
"""

from __future__ import annotations

import argparse

import tinker
from tinker import types

EXAMPLES = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Egypt?", "Cairo."),
]


def make_datum(tokenizer, question: str, answer: str, wire_types=types):
    """One Q/A example, loss only on the answer tokens (`wire_types`: `tinker.types` or `loom.types`)."""
    prompt = tokenizer.encode(f"Q: {question}\nA:")
    completion = tokenizer.encode(f" {answer}\n", add_special_tokens=False)
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return wire_types.Datum(
        model_input=wire_types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=args.base_model, rank=args.rank).result()
    tokenizer = training.get_tokenizer()
    batch = [make_datum(tokenizer, q, a) for q, a in EXAMPLES]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
    losses = []
    for step in range(args.steps):
        fb = training.forward_backward(batch, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=args.lr))
        loss = fb.result().metrics["loss:sum"] / n_tokens
        opt.result()
        losses.append(loss)
        print(f"step {step}: loss/token {loss:.4f}", flush=True)
    path = training.save_state("final").result().path
    print(f"saved {path}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
