"""The SL loop that `skyrl_head_to_head.py` runs against each server, through the official `tinker` SDK.

Runs in its own venv (.venv-tinker016, tinker 0.16.1, made by scripts/setup-skyrl), not Loom's: it imports only
the SDK, numpy and the standard library, so the very same client code drives Loom and SkyRL tx. It creates one LoRA
training client (rank 8, seed 0, train_unembed=False: the 7 attention and MLP projections, which is all SkyRL tx
0.3.0 trains), then runs SL steps, each [submit forward_backward(batch, "cross_entropy") and optim_step(AdamParams(lr))
back to back, then `.result()` on both] on one fixed batch, as shared/reference/skyrl_baseline.md's bench does.
The loss per step is -sum(logprobs) / target tokens, from `loss_fn_outputs`, which both servers return.

Lockstep protocol, so the caller can interleave two servers step by step: once the training client exists it prints
one JSON line {"tinker", "create_s"} on stdout; then each line read from stdin runs one step and prints
{"step_s", "loss"}; end of input ends the process. Everything else (SDK logs) goes to stderr.

Limits: wall time as the client sees it (loopback HTTP, the SDK's own polling included); no sampling or
checkpointing is timed.

    <venv>/bin/python benchmarks/tinker_sl_client.py URL API_KEY BASE_MODEL BATCH_JSON LR
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import tinker
from tinker import types


def batch_data(seqs: list[list[int]]) -> list[types.Datum]:
    """Each sequence of n+1 tokens as one datum: n input tokens, the next n as targets, all weight 1."""
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens=s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in seqs
    ]


def sl_step(training, data: list[types.Datum], lr: float) -> tuple[float, float]:
    """One step: (client wall seconds, mean cross-entropy per target token before the update)."""
    t = time.perf_counter()
    fb = training.forward_backward(data, "cross_entropy")
    op = training.optim_step(types.AdamParams(learning_rate=lr))
    out = fb.result()
    op.result()
    seconds = time.perf_counter() - t
    logprobs = np.concatenate([np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in out.loss_fn_outputs])
    return seconds, float(-logprobs.sum() / logprobs.size)


def say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(url: str, api_key: str, base_model: str, batch_json: str, lr: str) -> None:
    with open(batch_json) as f:
        data = batch_data(json.load(f))
    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    t = time.perf_counter()
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=0, train_unembed=False)
    say({"tinker": tinker.__version__, "create_s": time.perf_counter() - t})
    for _ in sys.stdin:
        seconds, loss = sl_step(training, data, float(lr))
        say({"step_s": seconds, "loss": loss})


if __name__ == "__main__":
    main(*sys.argv[1:])
