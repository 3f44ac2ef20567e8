"""Shared helpers for the worker unit tests (test_worker_*.py).

Base models are loaded once per test process (`shared_model`) because SmolLM2 takes a few seconds; every test
module registers its own adapters under its own slot ids (`register`), so modules never see each other's
adapters. Tests that own slot allocation themselves (the engine's `AdapterPool` counts slots from 0) take a
`fresh_model` instead.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch

from contract.catalogue import SMOLLM2, TINY_KIMI_K2
from contract.jobs import ClaimedJob
from contract.settings import Settings
from worker.engine import Engine
from worker.lora.adapter import LoraAdapter, LoraSpec, create_adapter
from worker.models.loader import LoadedModel, load_base_model
from worker.outcomes import Outcome
from worker.trainer import TrainDatum

MODELS = {"smollm2": SMOLLM2, "tiny_kimi_k2": TINY_KIMI_K2}
MODEL_CACHE = Settings().model_cache_dir

_slots = itertools.count(1000)

# The models are tiny per op (a few tokens): intra-op threads buy little, and on a loaded 2-core box OpenMP
# spin-waiting made these tests ~6x slower (measured 469 s vs 75 s for the worker files). An explicit
# OMP_NUM_THREADS still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@functools.cache
def shared_model(key: str) -> LoadedModel:
    return load_base_model(MODELS[key], MODEL_CACHE)


def fresh_model(key: str) -> LoadedModel:
    return load_base_model(MODELS[key], MODEL_CACHE)


def run_to_completion(engine: Engine, jobs: list[ClaimedJob]) -> list[Outcome]:
    """`engine.execute(jobs)`, then keep advancing until no sample is in flight (as the consumer's ticks do)."""
    outcomes = engine.execute(jobs)
    while engine.busy:
        outcomes += engine.execute([])
    return outcomes


def make_adapter(
    lm: LoadedModel,
    rank: int,
    seed: int,
    *,
    attn: bool = True,
    mlp: bool = True,
    unembed: bool = True,
    b_std: float | None = None,
    vision: bool = False,
) -> LoraAdapter:
    """A PEFT-initialised adapter; with `b_std`, B is drawn N(0, b_std²) (seeded) so A gets gradients too."""
    adapter = create_adapter(lm.targets, LoraSpec(rank, seed, attn, mlp, unembed, vision))
    if b_std is not None:
        gen = torch.Generator().manual_seed(10_000 + seed)
        for _, b in adapter.params.values():
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=gen) * b_std)
    return adapter


def register(lm: LoadedModel, adapter: LoraAdapter) -> int:
    slot = next(_slots)
    lm.router.adapters[slot] = adapter
    return slot


def token_ids(n: int, seed: int) -> list[int]:
    """`n` token ids drawn from the first 5,000 ids (ordinary text pieces in both tokenizers)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 5000, (n,), generator=gen).tolist()


def ce_datum(tokens: list[int], weights: list[float] | None = None) -> TrainDatum:
    """Next-token datum: inputs tokens[:-1], targets tokens[1:]."""
    inputs = {"target_tokens": torch.tensor(tokens[1:], dtype=torch.long)}
    if weights is not None:
        inputs["weights"] = torch.tensor(weights, dtype=torch.float32)
    return TrainDatum(tokens[:-1], inputs)


def rl_datum(tokens: list[int], seed: int, q_offset: float = 0.0) -> TrainDatum:
    """Next-token datum with sampler logprobs and advantages (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(tokens) - 1
    return TrainDatum(
        tokens[:-1],
        {
            "target_tokens": torch.tensor(tokens[1:], dtype=torch.long),
            "logprobs": -8.0 - 3.0 * torch.rand(n, generator=gen) + q_offset,
            "advantages": torch.randn(n, generator=gen),
        },
    )


def grads(adapter: LoraAdapter) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in adapter.named_parameters()}


def ref_logits(lm: LoadedModel, tokens: list[int], slot: int | None) -> torch.Tensor:
    """Full-sequence logits of one row with `slot`'s adapter (None: base model), no cache, no padding."""
    with torch.no_grad(), lm.router.route([slot]):
        return lm.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
